#!/usr/bin/env bash
# Copy pytest, its pure-Python dependencies and tqdm from .venv into .device/site (git-ignored), for a
# device machine without pytest: carry ".device" with benchmarks/gpu_session.sh.
set -eu
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .device/site && mkdir -p .device/site
for name in pytest _pytest pluggy iniconfig packaging pygments tqdm py.py; do
    [ -e "$site/$name" ] && cp -r "$site/$name" .device/site/
done
du -sh .device/site
