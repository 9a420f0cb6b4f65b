"""Package layout (metadata lives in pyproject.toml).

The services live under services/ — one folder each, as the design card lays out — and import as
duopool.router, duopool.scheduler, duopool.worker and duopool.kvtransfer. Everything else is under duopool/.
"""

from setuptools import find_packages, setup

SERVICES = ["router", "scheduler", "worker", "kvtransfer"]

packages = find_packages(include=["duopool", "duopool.*"])
package_dir = {"duopool": "duopool"}
for name in SERVICES:
    for sub in [""] + ["." + p for p in find_packages(where=f"services/{name}")]:
        packages.append(f"duopool.{name}{sub}")
        package_dir[f"duopool.{name}{sub}"] = f"services/{name}" + sub.replace(".", "/")

setup(packages=packages, package_dir=package_dir)
