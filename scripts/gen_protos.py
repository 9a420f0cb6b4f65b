"""The one codegen path for protos/: emits _pb2.py, _pb2_grpc.py and .pyi into duopool/v1/.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 if the committed files are not current (CI)
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "duopool" / "v1"


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # dev dependency, pinned to the grpcio version

    protos = sorted(PROTO_ROOT.glob("duopool/v1/*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out_dir = out_root / "duopool" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.suffix in (".py", ".pyi"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if duopool/v1 is not what protoc emits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(pathlib.Path(tmp))
        stale = []
        for src in produced:
            dst = OUT_PACKAGE / src.name
            if args.check:
                if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
                    stale.append(dst.name)
            else:
                OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        if args.check:
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run python scripts/gen_protos.py")
                return 1
            print(f"generated code is current ({len(produced)} files)")
            return 0
    init = OUT_PACKAGE / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from protos/duopool/v1 by scripts/gen_protos.py. Do not edit."""\n')
    print(f"wrote {len(produced)} files to {OUT_PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
