// The scheduler's dashboard: polls /api/status every second and draws it.
// Every value from the master goes in as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const SHOWN_FAILURES = 8;
const STATES = ["succeeded", "failed", "cancelled"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function ago(seconds) {
  if (seconds < 1) return "just now";
  if (seconds < 90) return `${seconds.toFixed(0)} s ago`;
  return `${(seconds / 60).toFixed(0)} min ago`;
}

function duration(seconds) {
  if (!isFinite(seconds)) return "-";
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  const rest = (n, unit) => (n ? ` ${n} ${unit}` : "");
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min${rest(Math.round(seconds % 60), "s")}`;
  return `${Math.floor(seconds / 3600)} h${rest(Math.round((seconds % 3600) / 60), "min")}`;
}

function clock(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleTimeString() : "-";
}

function drawCounts(s) {
  for (const node of document.querySelectorAll("[data-count]")) {
    node.textContent = (s.counts[node.dataset.count] || 0).toLocaleString();
  }
  $("#total").textContent = s.total.toLocaleString();
  $("#rate").textContent = s.rate.toFixed(s.rate < 10 ? 1 : 0);
  const left = (s.counts.queued || 0) + (s.counts.running || 0);
  $("#eta").textContent = left === 0 ? "done" : s.rate > 0 ? duration(left / s.rate) : "-";
}

function drawChart(t) {
  // the last 5 minutes, or less while the first activity in them is recent (60 s at least)
  const all = t.succeeded.length;
  let first = all;
  for (let i = 0; i < all && first === all; i++) {
    if (STATES.some((st) => t[st][i] > 0)) first = i;
  }
  const from = Math.max(0, Math.min(first - 5, all - 60));
  const cut = Object.fromEntries(STATES.map((st) => [st, t[st].slice(from)]));
  const n = all - from;
  const svg = $("#chart");
  let max = 1, finished = 0, points = 0;
  for (let i = 0; i < n; i++) {
    const sum = STATES.reduce((acc, st) => acc + cut[st][i], 0);
    max = Math.max(max, ...STATES.map((st) => cut[st][i]));
    finished += sum;
    if (sum > 0) points++;
  }
  svg.replaceChildren();
  for (const frac of [0.25, 0.5, 0.75]) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("class", "grid");
    line.setAttribute("x1", 0); line.setAttribute("x2", 900);
    line.setAttribute("y1", 200 * frac); line.setAttribute("y2", 200 * frac);
    svg.append(line);
  }
  for (const st of STATES) {
    const xy = cut[st].map((v, i) =>
      `${((i / Math.max(1, n - 1)) * 900).toFixed(1)},${(196 - (v / max) * 190).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("class", st);
    line.setAttribute("points", xy.join(" "));
    svg.append(line);
  }
  svg.dataset.finished = finished;  // what the chart shows, for tests and curious readers
  svg.dataset.points = points;
  $("#chart-span").textContent = `last ${duration(n)}`;
  $("#chart-max").textContent = `peak ${max.toLocaleString()}/s`;
}

function drawWorkers(s) {
  const body = $("#workers tbody");
  body.replaceChildren(...s.workers.map((w) => {
    const state = !w.connected ? "not back yet" : w.draining ? "draining" : "ready";
    const running = w.running.length
      ? `${w.running.length}: ${w.running.slice(0, 8).join(", ")}${w.running.length > 8 ? ", …" : ""}`
      : "0";
    const tr = row([w.name, w.host || "-", w.concurrency, running, w.waiting.length,
                    ago(s.now - w.last_heartbeat), state]);
    tr.dataset.worker = w.name;
    if (w.draining) tr.className = "draining";
    if (!w.connected) tr.className = "gone";
    return tr;
  }));
  $("#worker-count").textContent = `(${s.workers.length})`;
}

function drawFailures(s) {
  const body = $("#failures tbody");
  if (!s.failures.length) {
    body.replaceChildren(row([el("td", "none", "muted")]));
    return;
  }
  body.replaceChildren(...s.failures.slice(0, SHOWN_FAILURES).map((f) => {
    // the last line says what happened; a traceback above it folds away
    const lines = (f.error || "-").trimEnd().split("\n");
    const error = el("td");
    error.append(el("pre", lines[lines.length - 1]));
    const said = (f.stderr || "").trimEnd().split("\n").pop();
    if (said) error.append(el("pre", `stderr: ${said}`, "muted"));
    if (lines.length > 1) {
      const more = el("details");
      more.append(el("summary", `all ${lines.length} lines`), el("pre", f.error));
      error.append(more);
    }
    const link = el("a", f.name ? `${f.id} (${f.name})` : f.id);
    link.href = `#job-${f.id}`;
    link.addEventListener("click", () => lookup(f.id));
    const id = el("td");
    id.append(link);
    return row([id, f.worker || "-", f.exit_code ?? "-", clock(f.ended), error]);
  }));
}

function draw(s) {
  $("#version").textContent = `v${s.version}, up ${duration(s.uptime)}`;
  const alert = $("#alert");
  alert.hidden = !s.journal_error;
  alert.textContent = s.journal_error ? `journal cannot write: ${s.journal_error}` : "";
  drawCounts(s);
  drawChart(s.throughput);
  drawWorkers(s);
  drawFailures(s);
  $("#updated").textContent = `updated ${clock(s.now)}`;
  document.body.dataset.updates = (Number(document.body.dataset.updates) || 0) + 1;
}

async function poll() {
  try {
    const reply = await fetch("/api/status", { cache: "no-store" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    draw(await reply.json());
  } catch (err) {
    $("#updated").textContent = `master not answering (${err.message}); retrying`;
  }
  setTimeout(poll, POLL_MS);
}

async function lookup(id) {
  const box = $("#job"), fields = $("#job-fields");
  box.hidden = false;
  fields.replaceChildren(el("dt", "job"), el("dd", `${id}: loading…`));
  const reply = await fetch(`/api/jobs/${encodeURIComponent(id)}`, { cache: "no-store" });
  const job = await reply.json();
  if (!reply.ok) {
    fields.replaceChildren(el("dt", "job"), el("dd", job.error));
    $("#job-stdout").textContent = $("#job-stderr").textContent = "";
    return;
  }
  const shown = {
    job: job.name ? `${job.id} (${job.name})` : job.id, state: job.state,
    ...(job.reason ? { waiting: job.reason } : {}),
    command: job.command, worker: job.worker || "-", "exit code": job.exit_code ?? "-",
    attempts: `${job.attempts}/${job.max_attempts}`, submitted: clock(job.submitted),
    started: clock(job.started), ended: clock(job.ended), error: job.error || "-",
  };
  fields.replaceChildren(...Object.entries(shown).flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  box.dataset.job = job.id;
  for (const stream of ["stdout", "stderr"]) {
    const pre = $(`#job-${stream}`);
    pre.textContent = job[stream] || "";
    pre.scrollTop = pre.scrollHeight;  // the tail is what matters
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#lookup").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup($("#job-id").value.trim());
  });
  poll();
});
