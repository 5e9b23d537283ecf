#!/usr/bin/env bash
# Installs what the Unity package's C# tests need: Debian's mono compiler (mcs), the mono class
# libraries the Core assembly references, and NUnit 2.6's console runner. Safe to run again.
set -euo pipefail

packages=(
  mono-mcs
  mono-runtime
  libmono-system-net-http4.0-cil
  libmono-system-runtime4.0-cil
  libmono-system-xml-linq4.0-cil
  nunit-console
  libnunit-framework2.6.3-cil
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "mcs: $(mcs --version)"
echo "mono: $(mono --version | head -n 1)"
echo "nunit-console: $(dpkg-query -W -f='${Version}' nunit-console)"
