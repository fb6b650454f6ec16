#!/usr/bin/env python3
"""Writes an OCI image archive (an OCI layout in a tar: oci-layout,
index.json, blobs/sha256/...) without a container engine or registry, for
`ctr images import`.

    oci-image.py --name localhost/cilium-rs/busybox:1 --out busybox.tar \
        --file /bin/busybox:/bin/busybox --busybox-links /bin/busybox \
        --entrypoint /bin/sh --cmd -c --cmd 'sleep 3600'

One uncompressed layer holds the files given (`SRC:DST`, mode and content
from SRC); with `--with-libs`, the shared libraries each one links (as
`ldd` resolves them on this machine, the loader included) at the same
paths. `--busybox-links BIN` adds a symlink in /bin for
every applet BIN lists. The layer's bytes depend on the inputs only (fixed
mtimes, owners, order), so the same inputs give the same digest.
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

MTIME = 0


def add_dirs(tar, seen, path):
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d and d not in seen:
            seen.add(d)
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = MTIME
            tar.addfile(info)


def layer(files, links, extra_dirs):
    buf = io.BytesIO()
    seen = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in extra_dirs:
            add_dirs(tar, seen, d.rstrip("/") + "/x")
        for src, dst in sorted(files, key=lambda f: f[1]):
            add_dirs(tar, seen, dst)
            st = os.stat(src)
            info = tarfile.TarInfo(dst.lstrip("/"))
            info.size = st.st_size
            info.mode = st.st_mode & 0o7777
            info.mtime = MTIME
            with open(src, "rb") as f:
                tar.addfile(info, f)
        for dst, target in sorted(links):
            add_dirs(tar, seen, dst)
            info = tarfile.TarInfo(dst.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mode = 0o777
            info.mtime = MTIME
            tar.addfile(info)
    return buf.getvalue()


def shared_libs(path):
    """Absolute paths of the libraries `path` links, per ldd (none for a
    static binary or a script)."""
    r = subprocess.run(["ldd", path], capture_output=True, text=True)
    if r.returncode != 0:
        return []
    libs = []
    for line in r.stdout.splitlines():
        for word in line.split():
            if word.startswith("/") and os.path.exists(word):
                libs.append(word)
    return libs


def blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mtime = MTIME
    out.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="full image name, e.g. localhost/cilium-rs/busybox:1")
    p.add_argument("--out", required=True)
    p.add_argument("--file", action="append", default=[], help="SRC:DST")
    p.add_argument("--busybox-links", help="busybox binary whose applets get /bin symlinks")
    p.add_argument("--with-libs", action="store_true", help="add the shared libraries the files link")
    p.add_argument("--strip", action="store_true", help="strip debug information from the ELF files given")
    p.add_argument("--dir", action="append", default=[], help="an empty directory in the image, e.g. /tmp")
    p.add_argument("--link", action="append", default=[], help="DST:TARGET, a symlink, e.g. /var/run:../run")
    p.add_argument("--entrypoint", action="append", default=[])
    p.add_argument("--cmd", action="append", default=[])
    p.add_argument("--env", action="append", default=["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"])
    a = p.parse_args()

    files = []
    for f in a.file:
        src, _, dst = f.partition(":")
        if not dst or not os.path.isfile(src):
            sys.exit(f"oci-image: --file {f!r}: want SRC:DST with SRC an existing file")
        files.append((src, dst))
    if a.strip:
        tmp = tempfile.mkdtemp(prefix="oci-image-")
        stripped = []
        for i, (src, dst) in enumerate(files):
            with open(src, "rb") as f:
                elf = f.read(4) == b"\x7fELF"
            if elf:
                out = os.path.join(tmp, f"{i}-{os.path.basename(src)}")
                subprocess.run(["strip", "--strip-debug", "-o", out, src], check=True)
                shutil.copymode(src, out)
                src = out
            stripped.append((src, dst))
        files = stripped
    if a.with_libs:
        have = {d for _, d in files}
        for src, _ in list(files):
            for lib in shared_libs(src):
                real = os.path.realpath(lib)
                if lib not in have:
                    have.add(lib)
                    files.append((real, lib))
    links = []
    if a.busybox_links:
        applets = subprocess.run([a.busybox_links, "--list"], check=True, capture_output=True, text=True).stdout.split()
        dsts = {d for _, d in files}
        links = [(f"/bin/{x}", "busybox") for x in applets if f"/bin/{x}" not in dsts and x != "busybox"]

    for l in a.link:
        dst, _, target = l.partition(":")
        if not target:
            sys.exit(f"oci-image: --link {l!r}: want DST:TARGET")
        links.append((dst, target))
    data = layer(files, links, a.dir)
    layer_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": a.env, "Entrypoint": a.entrypoint or None, "Cmd": a.cmd or None, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "scripts/oci-image.py"}],
    }
    with tarfile.open(a.out + ".tmp", "w") as out:
        lay, lay_size = blob(out, data)
        cfg_bytes = json.dumps(config, sort_keys=True).encode()
        cfg, cfg_size = blob(out, cfg_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": lay, "size": lay_size}],
        }
        man, man_size = blob(out, json.dumps(manifest, sort_keys=True).encode())
        tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": man,
                    "size": man_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"io.containerd.image.name": a.name, "org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        for name, body in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
            raw = json.dumps(body, sort_keys=True).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mtime = MTIME
            out.addfile(info, io.BytesIO(raw))
    os.replace(a.out + ".tmp", a.out)
    if a.strip:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"oci-image: {a.name} -> {a.out} (layer {lay}, {lay_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
