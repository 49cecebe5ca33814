"""python -m tests.testbed up|down|status [--hosts N] [--loopback] [--json]"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tests.testbed import bed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--hosts", type=int, default=3, help="how many hosts (default 3)")
    parser.add_argument("--loopback", action="store_true",
                        help="127.0.0.x hosts on one sshd and the local engine")
    parser.add_argument("--json", action="store_true", help="print the hosts as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "status":
            print(json.dumps({**bed.status(), "leftovers": bed.leftovers()}, indent=2))
            return 0
        if args.command == "down":
            bed.loopback_down() if args.loopback else bed.down()
            print(f"testbed: down in {time.monotonic() - started:.1f}s", file=sys.stderr)
            return 0
        testbed = bed.loopback_up(args.hosts) if args.loopback else bed.up(args.hosts)
    except bed.TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"testbed: {testbed.mode} up in {time.monotonic() - started:.1f}s", file=sys.stderr)
    if args.json:
        print(json.dumps([host.as_dict() for host in testbed.hosts], indent=2))
    else:
        for host in testbed.hosts:
            print(f"{host.name}\t{host.ssh_url}\t{host.docker_url}")
        print(f"ssh: ssh -F {testbed.hosts[0].ssh_config} {testbed.hosts[0].name}; "
              f"docker-py over ssh: HOME={testbed.hosts[0].home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
