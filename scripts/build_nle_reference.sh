#!/usr/bin/env bash
# Builds BALROG's C++ NetHack describer (NLELanguageObsv from balrog-nle 0.9.0) as a cp311 module,
# for the byte-exact comparison in tests/test_nle_reference.py. Nothing at runtime needs it.
#
#   scripts/build_nle_reference.sh            # -> .cache/nle_reference/nle_language_wrapper/*.so
#   NLE_REF_DIR=/elsewhere scripts/build_nle_reference.sh
#
# Recipe (see /work/shared/reference/balrog-nle-text.md): nle-language-wrapper 0.2.0's sdist (only
# pip<24 accepts its metadata) supplies the build system and a vendored NLE; its pybind11 2.6 does
# not compile on Python 3.11, so the sdist's own pybind11 2.10 replaces it; its main.cpp is replaced
# by balrog-nle 0.9.0's (BALROG's text_message), with include paths fixed for this tree.
# A second run that finds the marker does nothing. On failure FAILED holds the step and the log tail.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${NLE_REF_DIR:-$ROOT/.cache/nle_reference}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

NLW_VERSION=0.2.0
BALROG_NLE_VERSION=0.9.0
# The sdists this recipe was checked against; a different upload would be a different reference.
NLW_SHA256=e58b0d260ee36d66fac53b62a0faa606f9793f5dd644f2294dc65d6826d165c0
BALROG_NLE_SHA256=10cd24d8483353ceb58c8c817d5134bc6edd60017a0f71dc465031bfeb66b957
MARKER="$DEST/MARKER"
MODDIR="$DEST/nle_language_wrapper"

if [ -f "$MARKER" ] && ls "$MODDIR"/nle_language_obsv*.so >/dev/null 2>&1; then
    echo "nle reference already built: $MODDIR ($(grep -m1 '^built_at=' "$MARKER" || true))"
    exit 0
fi

mkdir -p "$DEST"
LOG="$DEST/build.log"
: >"$LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nle_reference.XXXXXX")"
STEP="start"
START=$(date +%s)

on_exit() {
    rc=$?
    if [ "$rc" -ne 0 ]; then
        { echo "step: $STEP (exit $rc)"; echo "log: $LOG"; echo "---"; tail -n 40 "$LOG"; } >"$DEST/FAILED"
        echo "build_nle_reference: FAILED at step '$STEP' (see $DEST/FAILED)" >&2
    fi
    rm -rf "$WORK"
}
trap on_exit EXIT

log() { echo "[build_nle_reference] $*" | tee -a "$LOG"; }

# 1. System packages: bison and flex for NetHack's level compilers; cmake, g++, bzip2 headers.
STEP="system packages"
need=()
command -v bison >/dev/null || need+=(bison)
command -v flex >/dev/null || need+=(flex)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
[ -f /usr/include/bzlib.h ] || need+=(libbz2-dev)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo"
    else
        log "missing ${need[*]}; need root or passwordless sudo to apt-get install them"
        exit 1
    fi
    log "apt-get install ${need[*]}"
    $SUDO apt-get update -qq >>"$LOG" 2>&1
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >>"$LOG" 2>&1
fi

# 2. A throwaway venv with a pip old enough to download nle-language-wrapper.
STEP="build venv"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' >>"$LOG" 2>&1 \
    || { log "needs Python 3.11 (the reference is a cp311 module); $PY is not; set PYTHON="; exit 1; }
"$PY" -m venv "$WORK/venv" >>"$LOG" 2>&1
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check 'pip<24' 'setuptools<70' wheel >>"$LOG" 2>&1

# 3. The two sdists, checked against the recorded hashes.
STEP="download sdists"
"$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$WORK/sdist" \
    "nle-language-wrapper==$NLW_VERSION" >>"$LOG" 2>&1
"$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$WORK/sdist" \
    "balrog-nle==$BALROG_NLE_VERSION" >>"$LOG" 2>&1
NLW_TGZ="$WORK/sdist/nle-language-wrapper-$NLW_VERSION.tar.gz"
BNLE_TGZ="$WORK/sdist/balrog_nle-$BALROG_NLE_VERSION.tar.gz"
echo "$NLW_SHA256  $NLW_TGZ" | sha256sum -c - >>"$LOG" 2>&1
echo "$BALROG_NLE_SHA256  $BNLE_TGZ" | sha256sum -c - >>"$LOG" 2>&1

# 4. Unpack and patch.
STEP="patch sources"
tar -xzf "$NLW_TGZ" -C "$WORK"
tar -xzf "$BNLE_TGZ" -C "$WORK"
SRC="$WORK/nle-language-wrapper-$NLW_VERSION"
BMAIN="$WORK/balrog_nle-$BALROG_NLE_VERSION/win/rl/language_wrapper/main.cpp"
rm -rf "$SRC/nle/third_party/pybind11"
cp -r "$SRC/pybind11" "$SRC/nle/third_party/pybind11"
# balrog-nle compiles main.cpp inside NLE's own tree; here the headers live under include/, and
# permonst.h / pm.h / rm.h already come in through hack.h.
sed -e 's|^#include "display.h"|#include "include/display.h"|' \
    -e 's|^#include "hack.h"|#include "include/hack.h"|' \
    -e '/^#include "permonst.h"/d' -e '/^#include "pm.h"/d' -e '/^#include "rm.h"/d' \
    "$BMAIN" >"$SRC/src/main.cpp"
grep -q '^#include "include/hack.h"' "$SRC/src/main.cpp"
grep -q '^#include "include/display.h"' "$SRC/src/main.cpp"
if grep -q '^#include "\(permonst\|pm\|rm\)\.h"' "$SRC/src/main.cpp"; then exit 1; fi

# 5. Build the wheel (setup.py runs a bare `python` for the vendored NLE: the venv goes first on PATH).
STEP="compile"
log "compiling (about a minute)"
(cd "$SRC" && PATH="$WORK/venv/bin:$PATH" "$VPY" -m pip wheel -q --disable-pip-version-check \
    --no-deps --no-build-isolation . -w "$WORK/dist") >>"$LOG" 2>&1
WHEEL=$(ls "$WORK"/dist/nle_language_wrapper-"$NLW_VERSION"-cp311-*.whl)

# 6. Install only the two shared objects (the package's __init__ needs the old gym) and smoke-test.
STEP="install"
STAGE="$DEST/.stage"
rm -rf "$STAGE" && mkdir -p "$STAGE/nle_language_wrapper"
"$VPY" - "$WHEEL" "$STAGE/nle_language_wrapper" <<'EOF' >>"$LOG" 2>&1
import os, sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("nle_language_wrapper/") and n.count("/") == 1 and ".so" in n]
    assert any("nle_language_obsv" in n for n in names) and any("libnethack" in n for n in names), names
    for n in names:
        with open(os.path.join(out, os.path.basename(n)), "wb") as f:
            f.write(z.read(n))
print("installed", names)
EOF
"$VPY" - "$STAGE/nle_language_wrapper" <<'EOF' >>"$LOG" 2>&1
import glob, importlib.util, sys
so = glob.glob(sys.argv[1] + "/nle_language_obsv*.so")[0]
spec = importlib.util.spec_from_file_location("nle_language_obsv", so)
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
m.NLELanguageObsv()
print("smoke test ok", so)
EOF
ELAPSED=$(( $(date +%s) - START ))
{
    echo "nle_language_wrapper=$NLW_VERSION"
    echo "balrog_nle=$BALROG_NLE_VERSION"
    echo "nle_language_wrapper_sdist_sha256=$NLW_SHA256"
    echo "balrog_nle_sdist_sha256=$BALROG_NLE_SHA256"
    echo "balrog_main_cpp_sha256=$(sha256sum "$BMAIN" | cut -d' ' -f1)"
    echo "patched_main_cpp_sha256=$(sha256sum "$SRC/src/main.cpp" | cut -d' ' -f1)"
    echo "wheel=$(basename "$WHEEL")"
    echo "python=$("$VPY" -c 'import sys; print(sys.version.split()[0])')"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$ELAPSED"
} >"$STAGE/MARKER"
# Swap in by rename so a process that has the old module loaded keeps working.
rm -rf "$DEST/.old" "$DEST/FAILED"
[ -d "$MODDIR" ] && mv "$MODDIR" "$DEST/.old"
mv "$STAGE/nle_language_wrapper" "$MODDIR"
mv "$STAGE/MARKER" "$MARKER"
rm -rf "$STAGE" "$DEST/.old"
STEP="done"
log "built in ${ELAPSED}s: $MODDIR"
