"""Hugging Face checkpoints both ways (microgpt_jax/hf.py), against `transformers` itself, in float64.

Models are made here from a `transformers` config (random weights, nothing
downloaded), one GPT-2 and one Llama with grouped-query attention and
biases: imported, their logits equal those of `transformers`; our runs
exported load in `transformers` with the same logits and the same greedy
tokens; a bpe run's tokenizer encodes as ours; import then export gives the
same weight bytes. `transformers` computes Llama's RMSNorm and rope angles
in float32 whatever the model's dtype: here both run in float64 (the same
formulas, `float64_llama`), else the logits agree to 1e-7 only.
"""

import json
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax import hf
from microgpt_jax.data import DataConfig
from microgpt_jax.errors import UserError
from microgpt_jax.model import forward
from microgpt_jax.rundir import RunConfig, load_weights, start_weights
from microgpt_jax.sample import sample
from tests.helpers import assert_close, assert_one_line_error, run_in_process, save_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FINE_TUNE = ["--tokenizer", "byte", "--steps", "2", "--batch-size", "2", "--val-fraction", "0", "--log-every", "2", "--save-every", "2"]


@pytest.fixture(scope="module", autouse=True)
def float64_llama():
    """Llama's RMSNorm and rope angles in the model's dtype (float64 here), not float32: the same formulas."""
    from transformers.models.llama import modeling_llama as llama

    def rmsnorm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x, position_ids):
        K = 2 * self.inv_freq.numel()
        theta = self.config.rope_parameters["rope_theta"] ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
        angle = position_ids[..., None].to(torch.float64) * theta
        angle = torch.cat((angle, angle), -1)
        return angle.cos().to(x.dtype), angle.sin().to(x.dtype)

    saved = llama.LlamaRMSNorm.forward, llama.LlamaRotaryEmbedding.forward
    llama.LlamaRMSNorm.forward, llama.LlamaRotaryEmbedding.forward = rmsnorm, rope
    yield
    llama.LlamaRMSNorm.forward, llama.LlamaRotaryEmbedding.forward = saved


def perturbed(model):
    """The model in float64 with every weight moved off its init (gains off 1, biases off 0), for evaluation."""
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{arch: (model, its save_pretrained directory)}: a GPT-2 (tanh gelu, tied) and a Llama (GQA, biases, rope base 500)."""
    root = tmp_path_factory.mktemp("hf")
    gpt2 = transformers.GPT2Config(
        vocab_size=23,
        n_positions=48,
        n_embd=12,
        n_layer=2,
        n_head=3,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=22,
        eos_token_id=22,
    )
    llama = transformers.LlamaConfig(  # 257 ids: the byte tokenizer's, for fine-tuning without a tokenizer.json
        vocab_size=257, hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=48, attention_bias=True, mlp_bias=True, rope_theta=500.0, tie_word_embeddings=False,
    )  # fmt: skip
    models = {}
    torch.manual_seed(0)  # the same models whatever ran before in this process
    for model in (transformers.GPT2LMHeadModel(gpt2), transformers.LlamaForCausalLM(llama)):
        arch = type(model).__name__
        model = perturbed(model)
        model.save_pretrained(root / arch)
        models[arch] = (model, root / arch)
    return models


@pytest.fixture(scope="module")
def llama_run(made, tmp_path_factory, names_path):
    """A run of ours fine-tuned 2 steps from the Llama directory (no tokenizer.json: bytes), and its --format hf export."""
    from microgpt_jax import cli

    root = tmp_path_factory.mktemp("llama")
    cli.main(["train", "--init-from", str(made["LlamaForCausalLM"][1]), *FINE_TUNE, "--data", str(names_path), "--out", str(root / "run")])
    cli.main(["export", str(root / "run"), str(root / "hf"), "--format", "hf"])
    return root / "run", root / "hf"


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, names_docs):
    """A run of ours of the GPT-2 architecture (exact gelu, untied head, a bpe vocabulary), random weights, exported --format hf."""
    from microgpt_jax.model import GPTConfig, init_params_reference
    from microgpt_jax.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("gpt2")
    docs, tokenizer = names_docs[0][:2000], train_bpe(names_docs[0][:2000], 300)
    cfg = GPTConfig(
        vocab_size=tokenizer.size, n_embd=12, n_head=3, n_layer=2, block_size=48, norm="layernorm", norm_gain=True,
        embed_norm=False, final_norm=True, bias=True, activation="gelu_exact",
    )  # fmt: skip
    configs = RunConfig(model=cfg, data=DataConfig(tokenizer="bpe"))
    rng = np.random.default_rng(1)  # (numpy's draws and the scalar engine's init: no compile per weight's shape)
    noisy = lambda w: np.asarray(w + 0.3 * rng.normal(size=w.shape), np.float32)
    save_run(root / "run", jax.tree.map(noisy, init_params_reference(cfg, random.Random(0))), configs, tokenizer, "\n".join(docs))
    from microgpt_jax import cli

    cli.main(["export", str(root / "run"), str(root / "hf"), "--format", "hf"])
    return root / "run", root / "hf"


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(cfg, params, ids):
    return np.asarray(
        jax.jit(forward, static_argnums=2)(jax.tree.map(lambda w: jnp.asarray(w, jnp.float64), params), jnp.asarray(ids), cfg)
    )


def assert_same_logits(got, want, name):
    """check's tolerances: 1e-10 relative, with its 1e-12 floor for logits near 0 (torch's sums run in any order)."""
    assert_close(got, want, name)


IDS = np.random.default_rng(0).integers(0, 23, (2, 40))


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_an_imported_model_gives_transformers_logits_and_exports_the_same_bytes(made, arch, tmp_path):
    model, path = made[arch]
    cfg, tokenizer, params = hf.load(path)
    assert tokenizer is None and hf.architecture(cfg) == arch
    assert_same_logits(our_logits(cfg, params, IDS), logits_of(model, IDS), arch)

    hf.save(cfg, params, tokenizer, tmp_path / "again")  # the round trip: the same tensors, names, dtypes and bytes
    from safetensors.numpy import load_file

    theirs, ours = load_file(path / hf.WEIGHTS_FILE), load_file(tmp_path / "again" / hf.WEIGHTS_FILE)
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes() for k in ours)


@pytest.fixture(scope="module")
def exported(llama_run, gpt2_run):
    """{name: (our weights, transformers' model of the export)}."""
    out = {}
    for name, (run, export) in {"llama": llama_run, "gpt2": gpt2_run}.items():
        out[name] = load_weights(run), transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float64).eval()
    return out


def weights64(weights):
    return weights.cfg, jax.tree.map(lambda w: np.asarray(w, np.float64), weights.params)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_our_exported_run_gives_the_same_logits_in_transformers(exported, name):
    (cfg, params), model = weights64(exported[name][0]), exported[name][1]
    ids = IDS % cfg.vocab_size
    assert_same_logits(our_logits(cfg, params, ids), logits_of(model, ids), name)


def test_greedy_decoding_gives_transformers_tokens(exported):
    """Our sampler at temperature 0 (the KV cache, rope, GQA) and generate(do_sample=False), 32 tokens after a prompt."""
    (cfg, params), model = weights64(exported["llama"][0]), exported["llama"][1]
    prompt = [int(i) for i in IDS[0, :5]]
    ours = sample(params, cfg, 1, prompt=prompt, temperature=0.0, max_new_tokens=32)[0].ids
    generated = model.generate(torch.tensor([[cfg.bos, *prompt]]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    theirs = generated[0, 1 + len(prompt) :].tolist()
    assert len(ours) == 32 and ours == theirs  # (no BOS drawn: ours would stop there)


def test_a_fine_tuned_run_records_its_hugging_face_origin(made, llama_run):
    meta = json.loads((llama_run[0] / "run.json").read_text())
    assert meta["init_from"] == {"hf": str(made["LlamaForCausalLM"][1].resolve()), "step": 0}
    assert meta["model"]["n_kv_head"] == 2 and meta["model"]["bias"] and meta["data"]["tokenizer"] == "byte"


def test_a_bpe_runs_exported_tokenizer_is_ours_in_transformers_and_back(gpt2_run):
    run, export = gpt2_run
    tokenizer = load_weights(run).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(export)
    text = "Emma, Olivia and Ava met Isabella; sophia-mia?"
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.ids(text).tolist()
    assert theirs.convert_tokens_to_ids(hf.BOS_TOKEN) == tokenizer.bos
    assert hf.load(export)[1] == tokenizer  # read back (as --init-from does): our tokenizer, BOS set aside


def test_without_tokenizer_json_the_datas_tokenizer_must_have_the_vocabulary_size(made, names_path):
    from microgpt_jax.session import Session

    weights = start_weights(made["GPT2LMHeadModel"][1])  # 23 ids, no tokenizer.json; names' characters are 27
    with pytest.raises(UserError, match="has no tokenizer.json and 23 token ids, the data's char tokenizer 27; pass --tokenizer byte"):
        Session(RunConfig(model=weights.cfg), names_path).state_from(weights)


def test_refusals_are_one_line(made, gpt2_run, tmp_path, capsys, names_docs):
    from microgpt_jax.model import GPTConfig, init_params_reference

    docs, tokenizer = names_docs
    params = init_params_reference(GPTConfig(vocab_size=tokenizer.size), random.Random(0), np.float32)
    default = save_run(tmp_path / "microgpt", params, RunConfig(), tokenizer, "a\n")
    code, out = run_in_process(capsys, "export", default, tmp_path / "out", "--format", "hf")
    assert_one_line_error(code, out.err, 'model.norm = "rmsnorm" does not map to GPT2LMHeadModel', "--format safetensors")
    code, out = run_in_process(capsys, "export", gpt2_run[0], gpt2_run[1], "--format", "hf")
    assert_one_line_error(code, out.err, "already exists")
    assert not (tmp_path / "out").exists()

    path = tmp_path / "broken"
    shutil.copytree(made["LlamaForCausalLM"][1], path)
    config = json.loads((path / "config.json").read_text())
    cases = [
        ({**config, "architectures": ["MistralForCausalLM"]}, "architecture 'MistralForCausalLM' is not supported"),
        ({**config, "rope_parameters": {"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}}, 'rope_type = "linear" is not supported'),
        ({**config, "hidden_act": "tanh"}, 'hidden_act = "tanh" is not supported'),
        ({**config, "mlp_bias": False}, "mlp_bias must equal attention_bias"),
        ({**config, "intermediate_size": 24}, "mlp.gate_proj.weight is [20, 16], its config.json makes it [24, 16]"),
    ]
    for content, fragment in cases:
        (path / "config.json").write_text(json.dumps(content))
        code, out = run_in_process(capsys, "train", "--init-from", path, "--out", tmp_path / "new")
        assert_one_line_error(code, out.err, fragment)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    code, out = run_in_process(capsys, "train", "--init-from", path, "--out", tmp_path / "new")
    assert_one_line_error(code, out.err, "has no model.safetensors")
    assert not (tmp_path / "new").exists()
