#!/usr/bin/env bash
# Make sure a headless browser for tests/test_chat_page.py is installed: Debian's chromium and
# chromium-driver, installed with apt-get when missing (as root). Never touches an installed one.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver are installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium and chromedriver are needed by the browser test and this user is not root:" \
         "install chromium and chromium-driver (Debian), then retry." >&2
    exit 1
fi
echo "Installing chromium and chromium-driver with apt-get..."
DEBIAN_FRONTEND=noninteractive apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
command -v chromium >/dev/null && command -v chromedriver >/dev/null
