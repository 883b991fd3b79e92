#!/usr/bin/python3
"""An independent fp64 NumPy implementation of the Kimi Linear forward pass (KIMI_LINEAR.md §2-§6),
written from the spec alone: token by token, the KDA recurrence of §3.6 (no chunking), MLA with
decompressed keys and values (no absorption), the MoE of §6.2. It shares no code with the C++ engine.

golden check:  kimi_linear_numpy.py KLS WORK_DIR
  makes a tiny bf16 model with `KLS make-model`, runs `KLS generate --dump-logits` on it with a
  fixed 100-token prompt and greedy decoding, recomputes the logits of every sampled step here,
  and fails if the C++ logits differ by more than 1e-4 (normwise relative) or a greedy token
  differs.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np


def load_safetensors(model_dir):
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        files = sorted(set(json.load(open(index_path))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        data = open(os.path.join(model_dir, name), "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            b, e = info["data_offsets"]
            raw = data[base + b:base + e]
            if info["dtype"] == "F32":
                arr = np.frombuffer(raw, dtype="<f4").astype(np.float64)
            elif info["dtype"] == "F16":
                arr = np.frombuffer(raw, dtype="<f2").astype(np.float64)
            elif info["dtype"] == "BF16":
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                arr = bits.view(np.float32).astype(np.float64)
            else:
                raise ValueError(f"dtype {info['dtype']}")
            tensors[key] = arr.reshape(info["shape"])
    return tensors


def rms_norm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


class Model:
    def __init__(self, model_dir):
        self.cfg = json.load(open(os.path.join(model_dir, "config.json")))
        self.w = load_safetensors(model_dir)
        c = self.cfg
        la = c["linear_attn_config"]
        self.kda_layers = set(la["kda_layers"])  # 1-based
        self.H, self.K, self.W = la["num_heads"], la["head_dim"], la["short_conv_kernel_size"]
        self.eps = c["rms_norm_eps"]
        self.reset()

    def reset(self):
        c = self.cfg
        self.state = {}
        for i in range(c["num_hidden_layers"]):
            if (i + 1) in self.kda_layers:
                hk = self.H * self.K
                self.state[i] = {"S": np.zeros((self.H, self.K, self.K)),
                                 "conv": [np.zeros((self.W - 1, hk)) for _ in range(3)]}
            else:
                self.state[i] = {"c": [], "kpe": []}

    def kda(self, i, a):
        p = f"model.layers.{i}.self_attn."
        w, H, K = self.w, self.H, self.K
        st = self.state[i]
        streams = []
        for s, name in enumerate(["q", "k", "v"]):
            x = w[p + f"{name}_proj.weight"] @ a                       # [HK]
            window = np.vstack([st["conv"][s], x[None, :]])             # [W, HK], oldest first
            cw = w[p + f"{name}_conv1d.weight"][:, 0, :]                # [HK, W], tap W-1 = current
            streams.append(silu(np.sum(cw.T * window, axis=0)))
            st["conv"][s] = window[1:]
        q, k, v = (x.reshape(H, K) for x in streams)
        q = q / np.sqrt(np.sum(q * q, axis=1, keepdims=True) + 1e-6)
        k = k / np.sqrt(np.sum(k * k, axis=1, keepdims=True) + 1e-6)
        f = w[p + "f_b_proj.weight"] @ (w[p + "f_a_proj.weight"] @ a)
        a_log = w[p + "A_log"].reshape(H)
        g = (-np.exp(a_log)[:, None] * softplus(f.reshape(H, K) + w[p + "dt_bias"].reshape(H, K)))
        beta = sigmoid(w[p + "b_proj.weight"] @ a)
        scale = K ** -0.5
        o = np.zeros((H, K))
        for h in range(H):
            S = st["S"][h] * np.exp(g[h])[:, None]
            pred = S.T @ k[h]
            delta = beta[h] * (v[h] - pred)
            S = S + np.outer(k[h], delta)
            st["S"][h] = S
            o[h] = S.T @ (scale * q[h])
        z = (w[p + "g_b_proj.weight"] @ (w[p + "g_a_proj.weight"] @ a)).reshape(H, K)
        on = w[p + "o_norm.weight"]
        y = np.stack([rms_norm(o[h], on, self.eps) * sigmoid(z[h]) for h in range(H)])
        return w[p + "o_proj.weight"] @ y.reshape(-1)

    def mla(self, i, a):
        c, w = self.cfg, self.w
        p = f"model.layers.{i}.self_attn."
        nh, dn, dr, dv, dc = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                              c["v_head_dim"], c["kv_lora_rank"])
        st = self.state[i]
        q = (w[p + "q_proj.weight"] @ a).reshape(nh, dn + dr)
        kv = w[p + "kv_a_proj_with_mqa.weight"] @ a
        st["c"].append(rms_norm(kv[:dc], w[p + "kv_a_layernorm.weight"], self.eps))
        st["kpe"].append(kv[dc:])
        C = np.array(st["c"])                                          # [L, dc]
        kpe = np.array(st["kpe"])                                      # [L, dr]
        up = (C @ w[p + "kv_b_proj.weight"].T).reshape(len(C), nh, dn + dv)
        out = np.zeros((nh, dv))
        for h in range(nh):
            keys = np.concatenate([up[:, h, :dn], kpe], axis=1)       # [L, dn+dr], no rotation
            scores = keys @ q[h] / np.sqrt(dn + dr)
            prob = np.exp(scores - scores.max())
            prob /= prob.sum()
            out[h] = prob @ up[:, h, dn:]
        return w[p + "o_proj.weight"] @ out.reshape(-1)

    def swiglu(self, x, gate, up, down):
        return self.w[down] @ (silu(self.w[gate] @ x) * (self.w[up] @ x))

    def ffn(self, i, b):
        c = self.cfg
        if i < c["first_k_dense_replace"] or i % c["moe_layer_freq"] != 0:
            p = f"model.layers.{i}.mlp."
            return self.swiglu(b, p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight")
        p = f"model.layers.{i}.block_sparse_moe."
        scores = sigmoid(self.w[p + "gate.weight"] @ b)
        biased = scores + self.w[p + "gate.e_score_correction_bias"]
        order = sorted(range(len(scores)), key=lambda e: (-biased[e], e))[:c["num_experts_per_token"]]
        weights = np.array([scores[e] for e in order])                  # unbiased (vLLM)
        if c["moe_renormalize"]:
            weights = weights / weights.sum()
        weights = weights * c["routed_scaling_factor"]
        out = self.swiglu(b, p + "shared_experts.gate_proj.weight", p + "shared_experts.up_proj.weight",
                          p + "shared_experts.down_proj.weight")
        for e, wt in zip(order, weights):
            q = p + f"experts.{e}."
            out = out + wt * self.swiglu(b, q + "w1.weight", q + "w3.weight", q + "w2.weight")
        return out

    def step(self, token):
        """Feeds one token; returns the logits of the next token."""
        c, w = self.cfg, self.w
        x = w["model.embed_tokens.weight"][token].copy()
        for i in range(c["num_hidden_layers"]):
            a = rms_norm(x, w[f"model.layers.{i}.input_layernorm.weight"], self.eps)
            x = x + (self.kda(i, a) if (i + 1) in self.kda_layers else self.mla(i, a))
            b = rms_norm(x, w[f"model.layers.{i}.post_attention_layernorm.weight"], self.eps)
            x = x + self.ffn(i, b)
        return w["lm_head.weight"] @ rms_norm(x, w["model.norm.weight"], self.eps)


def main():
    kls, work = sys.argv[1], sys.argv[2]
    model_dir = os.path.join(work, "tiny")
    subprocess.run([kls, "make-model", "--preset", "tiny", "--out", model_dir, "--seed", "4",
                    "--dtype", "bf16"], check=True, capture_output=True)
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, 256, size=100)]  # > 64: the chunked path runs
    steps = 6
    dump = os.path.join(work, "logits.f32")
    out = subprocess.run([kls, "generate", "--model", model_dir, "--prompt-ids",
                          " ".join(map(str, prompt)), "--max-tokens", str(steps), "--temperature", "0",
                          "--print-ids", "--dump-logits", dump, "--backend", "cpu"],
                         check=True, capture_output=True, text=True).stdout
    generated = [int(t) for t in out.split()]
    got = np.fromfile(dump, dtype="<f4").reshape(-1, vocab).astype(np.float64)
    if got.shape[0] != len(generated):
        print(f"FAIL: {got.shape[0]} logit rows for {len(generated)} tokens")
        return 1
    model = Model(model_dir)
    for t in prompt[:-1]:
        model.step(t)
    logits = model.step(prompt[-1])
    failures = 0
    for n, token in enumerate(generated):
        err = np.max(np.abs(got[n] - logits)) / np.max(np.abs(logits))
        ok = err <= 1e-4 and int(np.argmax(logits)) == token
        print(f"step {n}: token {token} (reference argmax {int(np.argmax(logits))}), "
              f"relative logit error {err:.2e} {'ok' if ok else 'FAIL'}")
        failures += not ok
        if n + 1 < len(generated):
            logits = model.step(token)
    print(f"{len(generated) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
