"""A load client for the agent's inference endpoint, run as a separate process by the tests.

``python -m tests.agent.oip_client --uds PATH | --url URL --seeds 1.0.0=0,1.1.0=5 --stop-file F --out F``
sends batch-1 requests (JSON and binary in turn) until the stop file appears, checks each answer against the
reference model of the version the answer names, touches ``<out>.<version>`` on the first answer from each
version, and writes counts to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.agent.bundles import reference_model, sample_inputs


def _request(client: httpx.Client, x: np.ndarray, binary: bool) -> tuple[str, np.ndarray, dict[str, Any]]:
    if binary:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            }
        ).encode()
        r = client.post(
            "/v2/models/digits/infer",
            content=header + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        r.raise_for_status()
        n = int(r.headers["Inference-Header-Content-Length"])
        doc = json.loads(r.content[:n])
        y = np.frombuffer(r.content[n:], dtype="<f4").reshape(doc["outputs"][0]["shape"])
    else:
        r = client.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]},
        )
        r.raise_for_status()
        doc = r.json()
        y = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
    return str(doc["model_version"]), y, doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds")
    ap.add_argument("--url", default="http://agent")
    ap.add_argument("--token")
    ap.add_argument("--seeds", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    seeds = {k: int(v) for k, v in (p.split("=") for p in args.seeds.split(","))}
    transport = httpx.HTTPTransport(uds=args.uds) if args.uds else None
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    stop = Path(args.stop_file)
    x = sample_inputs(1, seed=7)
    expected = {v: reference_model(x, seed) for v, seed in seeds.items()}
    ok = 0
    failures: list[str] = []
    versions: dict[str, int] = {}
    ids: set[str] = set()
    with httpx.Client(transport=transport, base_url=args.url, headers=headers, timeout=30) as client:
        i = 0
        while not stop.exists():
            try:
                version, y, doc = _request(client, x, binary=i % 2 == 1)
                pid = doc["parameters"]["prediction_id"]
                if version not in expected or not np.allclose(y, expected[version], atol=1e-5):
                    failures.append(f"wrong answer for version {version}")
                elif pid in ids:
                    failures.append(f"prediction id {pid} seen twice")
                else:
                    ok += 1
                    ids.add(pid)
                    if version not in versions:  # tell the test which releases this client has seen
                        Path(f"{args.out}.{version}").touch()
                    versions[version] = versions.get(version, 0) + 1
            except Exception as exc:  # every failure is counted and reported, not raised
                failures.append(repr(exc)[:300])
                time.sleep(0.01)
            i += 1
    Path(args.out).write_text(
        json.dumps({"ok": ok, "failures": failures[:50], "failed": len(failures), "versions": versions})
    )


if __name__ == "__main__":
    main()
