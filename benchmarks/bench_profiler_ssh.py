"""Does the SSH runner measure the same thing as the local runner, and what does it cost?

Profiles one bundle (logistic regression on the digits scans, ONNX, batch 1) on
this machine through the local runner and through the SSH runner against a
throw-away sshd on 127.0.0.1 (the same checks as tests/test_profiler_ssh.py),
alternating three times, and prints medians side by side. Latency ratios near
1.0 mean the transport does not leak into the numbers; the wall-time column is
the price of syncing the bundle and the ssh round trips.

    .venv/bin/python benchmarks/bench_profiler_ssh.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from profiler_fixtures import write_onnx  # noqa: E402
from sshd_fixture import SSHD, make_minimal_venv, running_sshd  # noqa: E402

from edgeopt.data import load_dataset  # noqa: E402
from edgeopt.profiler import Device, make_bundle, profile_bundle  # noqa: E402

TIMING = {"runs": 300, "min_seconds": 1.0, "warmup": 20}
ROUNDS = 3


def main() -> None:
    if not SSHD.exists():
        sys.exit("needs /usr/sbin/sshd (apt-get install -y openssh-server)")
    splits = load_dataset("digits", flatten=True)
    clf = LogisticRegression(max_iter=500).fit(splits.train.x.numpy(), splits.train.y.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_onnx(clf.coef_.T.astype(np.float32).copy(), clf.intercept_.astype(np.float32),
                           root / "digits.onnx")
        bundle = make_bundle(model, "onnxruntime", splits.eval.x, splits.eval.y, root / "bundle", threads=1)
        python = make_minimal_venv(root / "venv")
        (root / "sshd").mkdir()
        with running_sshd(root / "sshd") as server:
            device = Device(name="loopback", host=server.alias, profile="x86-cpu", ssh_config=server.config,
                            workdir=str(root / "remote"), python=str(python))
            rows: dict[str, list[dict]] = {"local": [], "ssh": []}
            for _ in range(ROUNDS):
                for runner in rows:
                    start = time.perf_counter()
                    result = profile_bundle(bundle, runner=runner, device=device if runner == "ssh" else None,
                                            **TIMING)
                    result["wall_s"] = time.perf_counter() - start
                    rows[runner].append(result)

    def med(runner: str, key: str) -> float:
        values = [r["latency_ms"][key] if key in r["latency_ms"] else r[key] for r in rows[runner]]
        return statistics.median(values)

    print(f"digits logistic regression, ONNX Runtime, 1 thread, batch 1; median of {ROUNDS} alternating rounds")
    print(f"{'metric':<16}{'local':>12}{'ssh':>12}{'ssh/local':>11}")
    for key in ("mean", "p50", "p90", "p99", "init_ms", "peak_rss_mb", "wall_s"):
        a, b = med("local", key), med("ssh", key)
        label = f"latency {key} ms" if key in ("mean", "p50", "p90", "p99") else key
        print(f"{label:<16}{a:>12.4f}{b:>12.4f}{b / a:>11.2f}")
    accs = {runner: {r["accuracy"]["top1"] for r in results} for runner, results in rows.items()}
    print(f"top-1 local {sorted(accs['local'])}  ssh {sorted(accs['ssh'])}  identical: {accs['local'] == accs['ssh']}")


if __name__ == "__main__":
    main()
