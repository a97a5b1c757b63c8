#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages lowmark's tests, benches and embedded Kafka need,
# only those missing. Fast and silent when everything is there (`make tools` runs it on
# every `make test`).
#
#   java >= 17 (default-jre-headless) + mvn (maven): run Kafka from Maven Central jars
#   fio, qemu-img/qemu-io (qemu-utils), nbdinfo/nbdcopy (libnbd-bin), nbdsh
#   (python3-libnbd), nbdkit, kcat: the clients the tests and benches drive lowmark with;
#   openssl: the TLS tests make their certificates with it; chromium: the console's
#   browser test drives it (headless, through Playwright); tmux: `lowmark status --watch`
#   is captured in a real 80-column terminal
set -euo pipefail

# command -> package providing it
tools=(
  "java:default-jre-headless"
  "mvn:maven"
  "fio:fio"
  "qemu-img:qemu-utils"
  "qemu-io:qemu-utils"
  "nbdinfo:libnbd-bin"
  "nbdcopy:libnbd-bin"
  "nbdsh:python3-libnbd"
  "nbdkit:nbdkit"
  "kcat:kcat"
  "openssl:openssl"
  "chromium:chromium"
  "tmux:tmux"
)

missing=()
add() { [[ " ${missing[*]-} " == *" $1 "* ]] || missing+=("$1"); }

for entry in "${tools[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || add "${entry#*:}"
done

# Kafka 4 needs Java 17+; an older java on PATH counts as missing.
if command -v java >/dev/null 2>&1; then
  version=$(java -version 2>&1 | sed -n 's/.*version "\([0-9][0-9.]*\).*/\1/p' | head -1)
  major=${version%%.*}
  [[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$version")
  if [[ -z $major || $major -lt 17 ]]; then
    echo "tools: java on PATH is version ${version:-unknown}; Kafka needs >= 17" >&2
    add default-jre-headless
  fi
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "tools: all present"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "tools: missing packages: ${missing[*]}" >&2
  echo "tools: install them as root:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "tools: missing ${missing[*]} and this is not a Debian/Ubuntu system (no apt-get);" \
       "install the equivalents by hand" >&2
  exit 1
fi

echo "tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "tools: installed ${missing[*]}"
