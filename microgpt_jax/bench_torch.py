"""`bench torch`'s baseline: our GPT written the way a PyTorch user writes it, trained on our batches.

microgpt's architecture (learned positions, rmsnorm without gains, relu MLP,
no biases, an untied lm_head), from the very weights our run starts from,
on the very token batches of our data source, with torch's Adam and our
learning-rate schedule set on it each step: the same work, step for step,
so that tokens/s side by side compare the two libraries and nothing else.
Attention is torch's own fused `scaled_dot_product_attention` (causal), the
loss `cross_entropy`: what a PyTorch user reaches for, not our formulation.
"""

import time

import numpy as np

from microgpt_jax.model import GPTConfig, param_shapes

# the GPTConfig fields the baseline holds at microgpt's value (it follows the shape's and norm_eps)
VARIANT_FIELDS = ("norm", "activation", "pos", "tie_embeddings", "qk_norm", "n_kv_head", "logit_softcap", "dropout", "norm_gain")
VARIANT_FIELDS += ("embed_norm", "final_norm", "bias", "mlp", "mlp_hidden")


def torch_or_none():
    """torch, or None where it is not installed (it comes with the [hf] extra)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def check_covered(cfg: GPTConfig):
    """The baseline is microgpt's architecture only: a config with any variant is refused, by name."""
    changed = [name for name in VARIANT_FIELDS if getattr(cfg, name) != getattr(GPTConfig(), name)]
    if changed:
        raise ValueError(f"the torch baseline has microgpt's architecture only; this config changes {changed}")


def make_model(params: dict, cfg: GPTConfig):
    """A torch.nn.Module holding a float copy of `params` (our keys, '.' as '_'), whose call is the mean loss."""
    import torch
    import torch.nn.functional as F

    check_covered(cfg)
    H, K = cfg.n_head, cfg.head_dim

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            weights = {name.replace(".", "_"): torch.nn.Parameter(torch.tensor(np.asarray(params[name]))) for name in param_shapes(cfg)}
            self.w = torch.nn.ParameterDict(weights)

        def forward(self, tokens_BT, targets_BT):
            w, (B, T) = self.w, tokens_BT.shape
            x_BTD = F.rms_norm(w["wte"][tokens_BT] + w["wpe"][:T], (cfg.n_embd,), eps=cfg.norm_eps)
            for i in range(cfg.n_layer):
                p = f"layer{i}_"
                h_BTD = F.rms_norm(x_BTD, (cfg.n_embd,), eps=cfg.norm_eps)
                q, k, v = (F.linear(h_BTD, w[p + name]).view(B, T, H, K).transpose(1, 2) for name in ("attn_wq", "attn_wk", "attn_wv"))
                out_BHTK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x_BTD = x_BTD + F.linear(out_BHTK.transpose(1, 2).reshape(B, T, cfg.n_embd), w[p + "attn_wo"])
                h_BTD = F.rms_norm(x_BTD, (cfg.n_embd,), eps=cfg.norm_eps)
                x_BTD = x_BTD + F.linear(F.relu(F.linear(h_BTD, w[p + "mlp_fc1"])), w[p + "mlp_fc2"])
            logits_BTV = F.linear(x_BTD, w["lm_head"])
            return F.cross_entropy(logits_BTV.view(B * T, -1), targets_BT.reshape(B * T))

    return GPT()


def train_rate(params, cfg: GPTConfig, tcfg, data, chunk, chunks, compiled=False, lrs=None):
    """(tokens/s, compile-and-first-chunk seconds) of training the torch model on data's batches (stream mode:
    every position trained, equal weights), steady state: the median of chunks 2..chunks of `chunk` steps, each
    timed with its batches' building, as ours. compiled: the model's forward and backward through torch.compile.
    lrs: the learning rate of each step (our schedule's), else tcfg.lr."""
    import torch

    model = make_model(params, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    loss_of = torch.compile(model) if compiled else model
    seconds, tokens, clock = [], [], time.perf_counter()
    for c in range(chunks):
        batches = data.batches(c * chunk, chunk, chunk)
        for s in range(chunk):
            for group in optimizer.param_groups:
                group["lr"] = lrs[c * chunk + s] if lrs else tcfg.lr
            loss = loss_of(torch.from_numpy(batches.tokens[s].astype(np.int64)), torch.from_numpy(batches.targets[s].astype(np.int64)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()
        now = time.perf_counter()
        if c == 0:
            first_s = now - clock
        else:
            seconds.append(now - clock)
            tokens.append(int(np.count_nonzero(batches.weights)))
        clock = now
    median = int(np.argsort(seconds)[len(seconds) // 2])
    return tokens[median] / seconds[median], first_s
