#!/usr/bin/env python3
"""Gives the libgomp that auditwheel vendored into a repaired wheel its own soname back
(batchnorm.libs/libgomp.so.1), so that a process shares one OpenMP runtime between batchnorm
and the libraries that bring theirs under that name (torch ships libgomp.so.1 in torch/lib).

auditwheel renames every vendored library to a hashed soname (libgomp-<hash>.so.1.0.0), which
the loader never matches with another copy: beside torch a process then ran two OpenMP
runtimes, whose threads each spin for a while after a parallel region, on the same cores. Under
the plain soname the loader takes whichever libgomp.so.1 is loaded first for both (GNU libgomp
is backward compatible by symbol versions; libbatchnorm asks for GOMP_4.0 and OMP_1.0, which
every libgomp since GCC 4.9 has). With nothing loaded before it, libbatchnorm's RUNPATH still
finds the vendored copy, so the wheel needs no system libgomp.

    python tools/wheel_libgomp.py WHEEL      (rewrites WHEEL in place; needs patchelf on PATH)
"""
from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SONAME = "libgomp.so.1"


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def main(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        files = {i.filename: z.read(i) for i in infos}
    vendored = [n for n in files if re.fullmatch(r"[^/]+\.libs/libgomp-[0-9a-f]+\.so[.0-9]*", n)]
    if len(vendored) != 1:
        sys.exit(f"error: expected one hashed libgomp in {wheel.name}, found {vendored}")
    old = vendored[0]
    old_soname = old.rsplit("/", 1)[1]
    new = old.rsplit("/", 1)[0] + "/" + SONAME
    with tempfile.TemporaryDirectory() as tmp:
        def patched(name: str, *args: str) -> bytes:
            path = Path(tmp) / Path(name).name
            path.write_bytes(files[name])
            subprocess.run(["patchelf", *args, str(path)], check=True)
            return path.read_bytes()

        files[old] = patched(old, "--set-soname", SONAME)
        needing = [n for n in files if re.search(r"\.so(\.|$)", n) and n != old and old_soname.encode() in files[n]]
        for name in needing:
            files[name] = patched(name, "--replace-needed", old_soname, SONAME)
    files[new] = files.pop(old)
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    lines = [line for line in files[record].decode().splitlines() if line]
    rewritten = []
    for line in lines:
        name = line.split(",", 1)[0]
        if name == record:
            rewritten.append(f"{record},,")
        elif name == old:
            rewritten.append(record_line(new, files[new]))
        elif name in files:
            rewritten.append(record_line(name, files[name]) if name in needing else line)
    files[record] = ("\n".join(rewritten) + "\n").encode()
    tmp_wheel = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp_wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for info in infos:
            name = new if info.filename == old else info.filename
            out = zipfile.ZipInfo(name, date_time=info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(out, files[name])
    tmp_wheel.replace(wheel)
    print(f"{wheel.name}: {old} -> {new} (soname {SONAME}); {', '.join(needing)} now need {SONAME}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
