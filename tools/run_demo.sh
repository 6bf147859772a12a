#!/usr/bin/env bash
# The main job: builds lmhead (installing what is missing), starts the server with its built-in
# demo head (d_model=64, vocab 1000, seeded) on a free local port, and makes a demo call with the
# `lmhead` CLI: health, the model list, and a forward with labels whose outputs are printed.
# The server is stopped (SIGTERM, graceful) at the end.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(tools/setup.sh | tail -n 1)
bazel build //server:lmhead_server //client:lmhead

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

bazel-bin/server/lmhead_server --host 127.0.0.1 --port 0 --port_file "$work/port" \
  > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.1; done
[[ -s $work/port ]] || { cat "$work/server.log"; echo "the server did not start" >&2; exit 1; }
address="127.0.0.1:$(cat "$work/port")"
echo "lmhead server with the demo head at $address"

lmhead=bazel-bin/client/lmhead
echo "\$ lmhead health --address $address"
$lmhead health --address "$address"
echo "\$ lmhead models --address $address"
$lmhead models --address "$address"

# Two sequences of 8 hidden states and their next-token labels (one ignored).
"$venv/bin/python" - "$work" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(42)
np.save(f"{sys.argv[1]}/hidden.npy", rng.standard_normal((2, 8, 64), dtype=np.float32))
labels = rng.integers(0, 1000, size=(2, 8), dtype=np.int64)
labels[0, 0] = -100
np.save(f"{sys.argv[1]}/labels.npy", labels)
PY
echo "\$ lmhead forward --address $address --hidden hidden.npy --labels labels.npy --z_loss_multiplier 1e-4 --output out.safetensors"
$lmhead forward --address "$address" --hidden "$work/hidden.npy" --labels "$work/labels.npy" \
  --z_loss_multiplier 1e-4 --output "$work/out.safetensors"
"$venv/bin/python" - "$work/out.safetensors" <<'PY'
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    print("LMOutputWithLoss from", f.metadata())
    for name in ("logits", "loss", "ce_loss", "z_loss"):
        if name in f.keys():
            t = f.get_tensor(name)
            print(f"  {name}: {tuple(t.shape)} {t.dtype}" + ("" if t.dim() else f" = {t.item():.6f}"))
        else:
            print(f"  {name}: None")
PY
