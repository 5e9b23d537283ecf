#!/usr/bin/env bash
# Installs what the Unity package's C# tests need: Debian's mono compiler (mcs), the mono class
# libraries the Core assembly references, and NUnit 2.6's console runner. Safe to run again.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
apt_install \
  mono-mcs \
  mono-runtime \
  libmono-system-net-http4.0-cil \
  libmono-system-runtime4.0-cil \
  libmono-system-xml-linq4.0-cil \
  nunit-console \
  libnunit-framework2.6.3-cil

echo "mcs: $(mcs --version)"
echo "mono: $(mono --version | head -n 1)"
echo "nunit-console: $(dpkg-query -W -f='${Version}' nunit-console)"
