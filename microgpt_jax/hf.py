"""Hugging Face checkpoints, both ways: GPT2LMHeadModel and LlamaForCausalLM directories <-> GPTConfig and params.

A checkpoint directory is what `transformers`' save_pretrained writes:
config.json, model.safetensors (or shards listed in
model.safetensors.index.json) and, for a BPE vocabulary, tokenizer.json.
Reading and writing one needs no `transformers`: the config is JSON, the
weights safetensors. The conventions, each verified against `transformers`
in tests/test_hf.py:

- GPT-2's Conv1D weights are [in, out], ours [out, in]: every block matrix
  is transposed; c_attn holds q, k and v side by side along its outputs.
- GPT-2's "gelu_new" is our tanh `gelu`; its "gelu" our `gelu_exact` (erf).
- Llama's rotate_half pairs dims (i, i + K/2) of each head and turns them
  as `model.rotate` does: q_proj and k_proj map as they are, unpermuted.
- Grouped-query attention: `repeat_kv`'s query head h reads key/value head
  h // (H / G), as `model.attend` does.
- BOS: our BOS is the last id (vocab_size - 1); config.json names it as
  bos and eos, and an exported tokenizer.json adds it as "<|bos|>".
"""

import json
import shutil
from pathlib import Path

import numpy as np

from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig, param_shapes
from microgpt_jax.tokenizer import BPETokenizer

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"
BOS_TOKEN = "<|bos|>"

# What each architecture fixes of GPTConfig: a model that differs in one of these is not that architecture.
FIXED = {
    "GPT2LMHeadModel": dict(
        pos="learned", norm="layernorm", norm_gain=True, embed_norm=False, final_norm=True, bias=True, mlp="plain", qk_norm=False
    ),
    "LlamaForCausalLM": dict(pos="rope", norm="rmsnorm", norm_gain=True, embed_norm=False, final_norm=True, mlp="gated", qk_norm=False),
}
FIXED_EVERYWHERE = dict(logit_softcap=0.0)
# our activation -> the name `transformers` gives it (transformers.activations.ACT2CLS)
HF_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "relu2": "relu2", "silu": "silu"}
FROM_HF_ACTIVATIONS = {v: k for k, v in HF_ACTIVATIONS.items()} | {"gelu_pytorch_tanh": "gelu", "swish": "silu"}


# -- our model -> theirs -----------------------------------------------------------------------


def architecture(cfg: GPTConfig) -> str:
    """GPT2LMHeadModel (learned positions) or LlamaForCausalLM (rope) for cfg; a field that maps to neither is a UserError naming it."""
    arch = "GPT2LMHeadModel" if cfg.pos == "learned" else "LlamaForCausalLM"
    for name, value in (FIXED[arch] | FIXED_EVERYWHERE).items():
        if getattr(cfg, name) != value:
            raise UserError(
                f"model.{name} = {json.dumps(getattr(cfg, name))} does not map to {arch} (the architecture of pos = "
                f"{json.dumps(cfg.pos)}), which has {name} = {json.dumps(value)}; export this run with --format safetensors"
            )
    if cfg.activation not in HF_ACTIVATIONS:
        raise UserError(f"model.activation = {json.dumps(cfg.activation)} has no {arch} name; export with --format safetensors")
    if arch == "GPT2LMHeadModel" and cfg.kv_heads != cfg.n_head:
        raise UserError(
            f"model.n_kv_head = {cfg.n_kv_head} does not map to GPT2LMHeadModel (no grouped-query attention); use --format safetensors"
        )
    return arch


def hf_config(cfg: GPTConfig, arch: str, dtype) -> dict:
    """config.json of cfg as `transformers` reads it for arch, the weights in dtype."""
    common = dict(architectures=[arch], vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=np.dtype(dtype).name)
    common |= dict(bos_token_id=cfg.bos, eos_token_id=cfg.bos)
    if arch == "GPT2LMHeadModel":
        return common | dict(
            model_type="gpt2",
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.hidden,
            activation_function=HF_ACTIVATIONS[cfg.activation],
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            embd_pdrop=0.0,
            scale_attn_weights=True,
        )
    return common | dict(
        model_type="llama",
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act=HF_ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout,
    )


# their names of our weights: at the top, and in each layer (after their layer prefix), by our name without "_gain"/"_bias"
TOP = {
    "GPT2LMHeadModel": {"wte": "transformer.wte", "wpe": "transformer.wpe", "final_norm": "transformer.ln_f", "lm_head": "lm_head"},
    "LlamaForCausalLM": {"wte": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"},
}
LAYER_PREFIX = {"GPT2LMHeadModel": "transformer.h.", "LlamaForCausalLM": "model.layers."}
LAYER = {
    "GPT2LMHeadModel": {
        "attn_norm": "ln_1",
        "attn_wq": "attn.c_attn",  # with attn_wk and attn_wv after it
        "attn_wo": "attn.c_proj",
        "mlp_norm": "ln_2",
        "mlp_fc1": "mlp.c_fc",
        "mlp_fc2": "mlp.c_proj",
    },
    "LlamaForCausalLM": {
        "attn_norm": "input_layernorm",
        "attn_wq": "self_attn.q_proj",
        "attn_wk": "self_attn.k_proj",
        "attn_wv": "self_attn.v_proj",
        "attn_wo": "self_attn.o_proj",
        "mlp_norm": "post_attention_layernorm",
        "mlp_gate": "mlp.gate_proj",
        "mlp_fc1": "mlp.up_proj",
        "mlp_fc2": "mlp.down_proj",
    },
}


def key_map(cfg: GPTConfig, arch: str) -> list[tuple[str, tuple[str, ...]]]:
    """(their key, our keys) of every tensor: ours concatenated along the outputs make theirs (GPT-2's c_attn: q, k, v)."""
    pairs = []
    for name in param_shapes(cfg):
        prefix, _, rest = name.rpartition(".")  # "layer0", "attn_wq_bias"
        base, kind = (rest[:-5], "weight" if rest.endswith("_gain") else "bias") if rest.endswith(("_gain", "_bias")) else (rest, "weight")
        table = LAYER[arch] if prefix else TOP[arch]
        if base not in table:  # GPT-2's attn_wk and attn_wv: in c_attn, with attn_wq
            continue
        block = LAYER_PREFIX[arch] + prefix.removeprefix("layer") + "." if prefix else ""
        fused = arch == "GPT2LMHeadModel" and base == "attn_wq"
        pairs.append(
            (
                f"{block}{table[base]}.{kind}",
                tuple(name.replace("attn_wq", w) for w in ("attn_wq", "attn_wk", "attn_wv")) if fused else (name,),
            )
        )
    return pairs


def transposed(arch: str, theirs: str) -> bool:
    """GPT-2's Conv1D matrices are [in, out]: those of its blocks."""
    return arch == "GPT2LMHeadModel" and theirs.startswith("transformer.h.") and theirs.endswith(".weight") and ".ln_" not in theirs


def to_hf(cfg: GPTConfig, params: dict) -> tuple[str, dict, dict]:
    """(architecture, config.json, tensors) of our model, tensors in their dtype, contiguous."""
    arch = architecture(cfg)
    tensors = {}
    for theirs, ours in key_map(cfg, arch):
        w = np.concatenate([np.asarray(params[k]) for k in ours], axis=0)
        tensors[theirs] = np.ascontiguousarray(w.T if transposed(arch, theirs) else w)
    return arch, hf_config(cfg, arch, tensors[TOP[arch]["wte"] + ".weight"].dtype), tensors


def hf_tokenizer_json(tokenizer) -> str:
    """Our bpe tokenizer as `transformers` loads it: its ids, then BOS as the special token "<|bos|>"."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tokenizer.hf_json)
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True)])
    return tok.to_str()


def save(cfg: GPTConfig, params: dict, tokenizer, out_dir) -> str:
    """A checkpoint directory of our model (the architecture's config, weights and, for bpe, tokenizer files): the architecture.

    out_dir must not exist; it is written whole or not at all.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; pass a new directory so nothing is overwritten")
    if not out_dir.parent.is_dir():
        raise UserError(f"directory {out_dir.parent} does not exist; create it or pass another path")
    arch, config, tensors = to_hf(cfg, params)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if getattr(tokenizer, "kind", None) == "bpe":  # (a Hugging Face import may have none)
            (tmp / TOKENIZER_FILE).write_text(hf_tokenizer_json(tokenizer))
            special = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS_TOKEN, eos_token=BOS_TOKEN)
            (tmp / "tokenizer_config.json").write_text(json.dumps(special | {"model_max_length": cfg.block_size}, indent=2) + "\n")
        tmp.rename(out_dir)
    except OSError as e:
        raise UserError(f"could not write {out_dir} ({e.strerror or e}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch


# -- theirs -> ours ------------------------------------------------------------------------------


def is_checkpoint_dir(path) -> bool:
    """A Hugging Face checkpoint directory: config.json and no run.json (a run directory has that)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / "run.json").exists()


def gpt2_fields(get, refuse) -> tuple[str, dict]:
    """(activation_function, our fields) of a GPT-2 config.json (its defaults are GPT2Config's)."""
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if get(key, want) != want:
            refuse(key, get(key), f"our attention is scaled by 1 / sqrt(head size) only: {key} must be {json.dumps(want)}")
    fields = dict(
        n_embd=get("n_embd", 768),
        n_head=get("n_head", 12),
        n_layer=get("n_layer", 12),
        block_size=get("n_positions", 1024),
        mlp_hidden=get("n_inner") or 0,
        norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        dropout=float(get("resid_pdrop", 0.1)),
        tie_embeddings=get("tie_word_embeddings", True),
    )
    return get("activation_function", "gelu_new"), fields


def llama_fields(get, refuse) -> tuple[str, dict]:
    """(hidden_act, our fields) of a Llama config.json (its defaults are LlamaConfig's)."""
    scaling = get("rope_scaling") or {}
    rope = get("rope_parameters") or {"rope_type": scaling.get("rope_type", "default"), "rope_theta": get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters.rope_type", rope.get("rope_type"), "only the default rope: no scaling")
    if get("attention_bias", False) != get("mlp_bias", False):
        refuse("mlp_bias", get("mlp_bias"), "biases in all linear layers or none: mlp_bias must equal attention_bias")
    n_embd, n_head = get("hidden_size", 4096), get("num_attention_heads", 32)
    if get("head_dim") not in (None, n_embd // n_head):
        refuse("head_dim", get("head_dim"), f"the head size is hidden_size / num_attention_heads = {n_embd // n_head}")
    fields = dict(
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=get("num_key_value_heads") or n_head,
        n_layer=get("num_hidden_layers", 32),
        block_size=get("max_position_embeddings", 2048),
        mlp_hidden=get("intermediate_size", 11008),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        bias=get("attention_bias", False),
        dropout=float(get("attention_dropout", 0.0)),
        tie_embeddings=get("tie_word_embeddings", False),
    )
    return get("hidden_act", "silu"), fields


def from_hf_config(config: dict, path) -> GPTConfig:
    """Our GPTConfig of a GPT-2 or Llama config.json; anything we do not compute is one line naming its key."""
    by_type = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
    arch = (config.get("architectures") or [None])[0] or by_type.get(config.get("model_type"))
    if arch not in FIXED:
        raise UserError(f"{path}/{CONFIG_FILE}: architecture {arch!r} is not supported; start from a GPT2LMHeadModel or LlamaForCausalLM")

    def refuse(key, value, fix):
        raise UserError(f"{path}/{CONFIG_FILE}: {key} = {json.dumps(value)} is not supported ({fix})")

    gpt2 = arch == "GPT2LMHeadModel"
    act, fields = (gpt2_fields if gpt2 else llama_fields)(config.get, refuse)
    if act not in FROM_HF_ACTIVATIONS:
        refuse("activation_function" if gpt2 else "hidden_act", act, f"ours: {', '.join(FROM_HF_ACTIVATIONS)}")
    try:
        return GPTConfig(vocab_size=config.get("vocab_size"), activation=FROM_HF_ACTIVATIONS[act], **FIXED[arch], **fields)
    except UserError as e:
        raise UserError(f"{path}/{CONFIG_FILE}: {e}") from None


def read_tensors(path: Path) -> dict:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists, as numpy arrays."""
    from safetensors import SafetensorError, safe_open

    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / INDEX_FILE).is_file():
        try:
            files = [path / f for f in sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"could not read the shard list {path / INDEX_FILE} ({e}); save the model again") from None
    else:
        raise UserError(f"{path} has no {WEIGHTS_FILE} (nor {INDEX_FILE}); save the model with save_pretrained(safe_serialization=True)")
    tensors = {}
    try:
        for file in files:
            with safe_open(str(file), "flax") as f:  # flax: bfloat16 too, which numpy's loader refuses
                tensors |= {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not read {file} ({str(e).splitlines()[0]}); is it a safetensors file?") from None
    return tensors


def from_hf(cfg: GPTConfig, tensors: dict, path) -> dict:
    """Our params from their tensors (a missing or misshapen one is a UserError naming it; the rest are ignored)."""
    arch, shapes, params = architecture(cfg), param_shapes(cfg), {}
    if arch == "GPT2LMHeadModel":  # the original GPT-2 checkpoints name the transformer's tensors without "transformer."
        tensors = {k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v for k, v in tensors.items()}
    for theirs, ours in key_map(cfg, arch):
        if theirs not in tensors:
            raise UserError(f"{path}: the weights have no {theirs}, which the {arch} of its config.json has; save the model again")
        flip = transposed(arch, theirs)
        sizes = [shapes[k][0] for k in ours]
        want = (sum(sizes), *shapes[ours[0]][1:])
        w = tensors[theirs].T if flip else tensors[theirs]
        if w.shape != want:
            raise UserError(
                f"{path}: {theirs} is {list(tensors[theirs].shape)}, its config.json makes it {list(want[::-1] if flip else want)}"
            )
        params |= dict(zip(ours, np.split(w, np.cumsum(sizes)[:-1], axis=0)))
    return params


def read_tokenizer(path: Path, vocab_size: int):
    """tokenizer.json as our bpe tokenizer (its BOS, the last id, set aside), or None without one."""
    file = path / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
        bos = vocab_size - 1  # ours is the last id: an added (special) token there is set aside, a vocabulary entry there too
        meta["added_tokens"] = [t for t in meta.get("added_tokens", []) if t.get("id") != bos]
        meta["model"]["vocab"] = {t: i for t, i in meta["model"]["vocab"].items() if i != bos}
        tokenizer = BPETokenizer(json.dumps(meta))
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        problem = str(e).splitlines()[0][:80]
        raise UserError(
            f"{file} is not a byte-level BPE tokenizer we can use ({problem}); move it aside to train on the data's tokenizer"
        ) from None
    if tokenizer.size != vocab_size:
        raise UserError(f"{file} has {tokenizer.size} ids with BOS, the model {vocab_size}; move it aside to train on the data's tokenizer")
    return tokenizer


def load(path) -> tuple[GPTConfig, object, dict]:
    """(config, tokenizer or None, params) of a Hugging Face checkpoint directory; nothing is downloaded."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path / CONFIG_FILE} ({e}); pass a directory saved by save_pretrained") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / CONFIG_FILE} is not a JSON object; pass a directory saved by save_pretrained")
    cfg = from_hf_config(config, path)
    params = from_hf(cfg, read_tensors(path), path)
    return cfg, read_tokenizer(path, cfg.vocab_size), params
