#!/bin/sh
# Install real Fashion-MNIST from Debian's package `dataset-fashion-mnist` (issue 13 item 2).
# Called by `make setup` (so by `make test`, `make demo` and .ci/run). Never fails: every outcome
# is one line on stdout and exit status 0.
#
#   already present (FISHERLAB_FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist, or
#   data/debian/usr/share/datasets/fashion-mnist)  -> "found", nothing else runs (no apt call)
#   root + apt-get                                   -> apt-get install -y dataset-fashion-mnist
#   not root + apt-get + dpkg-deb                    -> apt-get download + dpkg-deb -x into
#                                                       data/debian/ (git-ignored), which
#                                                       fisherlab.datasets searches
#   anything else (no apt, no network, no candidate) -> one message; setup continues
#
# Options:  --user   take the non-root path even as root (download + extract, no system change)
#           --quiet  no line when the data are already present
# Test hooks (environment): FISHERLAB_FASHION_SYSTEM_DIR (default /usr/share/datasets/fashion-mnist),
# FISHERLAB_FASHION_DEST (default: data/debian next to this script).
set -u

PKG=dataset-fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
SYSTEM_DIR=${FISHERLAB_FASHION_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${FISHERLAB_FASHION_DEST:-$HERE/debian}
LOCAL_DIR=$DEST/usr/share/datasets/fashion-mnist
USER_MODE=0
QUIET=0
for arg in "$@"; do
    case $arg in
        --user) USER_MODE=1 ;;
        --quiet) QUIET=1 ;;
        *) echo "fashion-mnist: unknown option $arg (ignored)" ;;
    esac
done

say() { echo "fashion-mnist: $*"; }
unavailable() {
    say "not installed ($*); fisherlab runs without it (the 'fashion-mnist' data set is then" \
        "unavailable). On Debian/Ubuntu: sudo apt-get install $PKG, or set" \
        "FISHERLAB_FASHION_MNIST_DIR to a folder with its four *-ubyte.gz files."
    exit 0
}
complete() {  # all four files present and non-empty in $1
    [ -n "$1" ] || return 1
    for f in $FILES; do [ -s "$1/$f" ] || return 1; done
    return 0
}

for d in "${FISHERLAB_FASHION_MNIST_DIR:-}" "$SYSTEM_DIR" "$LOCAL_DIR"; do
    if complete "$d"; then
        [ "$QUIET" = 1 ] || say "found in $d"
        exit 0
    fi
done

command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get on this system"

if [ "$USER_MODE" = 0 ] && [ "$(id -u)" = 0 ]; then
    say "installing Debian's $PKG (apt-get install, ~31 MB) ..."
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PKG" >/dev/null 2>&1 \
        && complete "$SYSTEM_DIR"; then
        say "installed in $SYSTEM_DIR"
        exit 0
    fi
    unavailable "apt-get install $PKG failed: no network or no package candidate (try apt-get update)"
fi

command -v dpkg-deb >/dev/null 2>&1 || unavailable "no dpkg-deb to unpack the package"
mkdir -p "$DEST" 2>/dev/null && [ -w "$DEST" ] || unavailable "cannot write to $DEST"
TMP=$(mktemp -d "$DEST/.download.XXXXXX" 2>/dev/null) || unavailable "cannot write to $DEST"
trap 'rm -rf "$TMP"' EXIT
say "downloading Debian's $PKG (apt-get download, ~31 MB, no root needed) into $DEST ..."
if ! (cd "$TMP" && apt-get download -q "$PKG" >/dev/null 2>&1); then
    unavailable "apt-get download $PKG failed: no network or no package candidate"
fi
DEB=$(ls "$TMP"/*.deb 2>/dev/null | head -n 1)
[ -n "$DEB" ] || unavailable "apt-get download produced no .deb"
# Unpack beside the destination, then move the finished folder in (no half-written data folder).
if ! dpkg-deb -x "$DEB" "$TMP/root" >/dev/null 2>&1 \
    || ! complete "$TMP/root/usr/share/datasets/fashion-mnist"; then
    unavailable "dpkg-deb -x of $(basename "$DEB") did not give the four files"
fi
# Only the package's two folders are replaced (its data and its doc/copyright), nothing else.
for sub in datasets/fashion-mnist doc/$PKG; do
    [ -d "$TMP/root/usr/share/$sub" ] || continue
    mkdir -p "$(dirname "$DEST/usr/share/$sub")" && rm -rf "$DEST/usr/share/$sub" \
        && mv "$TMP/root/usr/share/$sub" "$DEST/usr/share/$sub" \
        || unavailable "cannot move the unpacked files into $DEST"
done
say "installed in $LOCAL_DIR"
exit 0
