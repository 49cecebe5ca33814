#!/bin/sh
# Shared step of both role images, run once at build time: put the kit's site directory on
# Python's path, add the `scheduler` command, precompile, and make the non-root user.
set -eu
kit=/opt/scheduler-kit

# A .pth file in the interpreter's own site directory works on any base (the official
# python image keeps it under /usr/local, Debian's python3 under dist-packages).
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$purelib"
echo "$kit/site" >"$purelib/scheduler-kit.pth"
ln -s "$kit/bin/scheduler" /usr/local/bin/scheduler
python3 -m compileall -q "$kit/site"
chmod -R a+rX,go-w "$kit"

useradd --uid 10001 --user-group --no-create-home \
  --home-dir /var/lib/scheduler --shell /usr/sbin/nologin scheduler
install -d -o scheduler -g scheduler -m 0750 /var/lib/scheduler
