"""Models: recipe sizes, forward contract, causality, and one-to-one parity with Hugging Face."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from muonq.config import ModelConfig
from muonq.models import GPT, Llama, build_model
from muonq.models.hf import hf_config, to_hf_state_dict

LLAMA = dict(model_type="llama", vocab_size=32000)
GPT2 = dict(model_type="gpt", vocab_size=50257)

# (recipe, config, total params, params in Muon matrices or None); shapes as in hydra_conf/recipe/*.yaml.
RECIPES = [
    ("llama-60m", dict(LLAMA, n_embd=512, intermediate_size=1376, n_head=8, n_layer=8), 58.1e6, 25.3e6),
    ("llama-130m", dict(LLAMA, n_embd=768, intermediate_size=2048, n_head=12, n_layer=12), 134e6, None),
    ("llama-350m", dict(LLAMA, n_embd=1024, intermediate_size=2736, n_head=16, n_layer=24), 368.0e6, 302.4e6),
    ("llama-1b", dict(LLAMA, n_embd=2048, intermediate_size=5461, n_head=32, n_layer=24), 1339.1e6, 1207.9e6),
    # GPT block_size = the recipe's context length: learned positions count towards the total.
    ("gpt-small", dict(GPT2, n_embd=768, n_head=12, n_layer=12, block_size=1024), 124.4e6, None),
    ("gpt-medium", dict(GPT2, n_embd=1024, n_head=16, n_layer=24, block_size=4096), 358e6, None),
    ("gpt-large", dict(GPT2, n_embd=1280, n_head=20, n_layer=36, block_size=8192), 783e6, None),
]

TINY_LLAMA = ModelConfig(
    model_type="llama", n_embd=64, n_layer=2, n_head=4, intermediate_size=160, vocab_size=128,
    rope_theta=5000.0, norm_eps=1e-6,
)
TINY_GPT = ModelConfig(model_type="gpt", n_embd=64, n_layer=2, n_head=4, vocab_size=128, block_size=32)
TINY = pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_GPT], ids=["llama", "gpt"])


def perturbed(cfg: ModelConfig) -> torch.nn.Module:
    """A tiny model whose every parameter (norm gains and biases too) is distinct, in eval mode."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name,kwargs,total,muon", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_param_counts(name: str, kwargs: dict, total: float, muon: float | None) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(**kwargs))
    assert model.num_params() == pytest.approx(total, rel=0.01)
    if muon is not None:
        assert sum(p.numel() for _, p in model.hidden_matrices()) == pytest.approx(muon, rel=0.01)


def test_exact_counts_llama_60m() -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(**RECIPES[0][1]))
    embeddings = 32000 * 512
    assert model.num_params() == 58_073_600
    assert model.num_params(exclude_embeddings=True) == 58_073_600 - embeddings
    hidden = 25_296_896
    assert model.flops_per_token(1024) == 6 * (hidden + embeddings) + 12 * 8 * 512 * 1024


@TINY
def test_forward_shapes_and_loss(cfg: ModelConfig) -> None:
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    targets = torch.randint(0, cfg.vocab_size, (3, 16))
    targets[0, :5] = -100
    logits = model(idx)
    assert logits.shape == (3, 16, cfg.vocab_size)
    loss = model(idx, targets)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@TINY
def test_model_traces_into_one_graph(cfg: ModelConfig) -> None:
    """torch.compile sees the whole forward (loss included) as one graph: a graph break would
    split it and leave the GPU idle between the pieces (recipe.training_params.compile)."""
    import torch._dynamo

    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@TINY
def test_causal(cfg: ModelConfig) -> None:
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_hf_parity_llama() -> None:
    model = perturbed(TINY_LLAMA)
    reference = LlamaForCausalLM(hf_config(TINY_LLAMA)).eval()
    reference.load_state_dict(to_hf_state_dict(model), strict=True)
    idx = torch.randint(0, TINY_LLAMA.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-5, rtol=1e-5)


def test_hf_parity_gpt() -> None:
    model = perturbed(TINY_GPT)
    reference = GPT2LMHeadModel(hf_config(TINY_GPT)).eval()
    missing, unexpected = reference.load_state_dict(to_hf_state_dict(model), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    reference.tie_weights()
    assert reference.lm_head.weight.data_ptr() == reference.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, TINY_GPT.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-5, rtol=1e-5)


def test_hidden_matrices_names() -> None:
    llama_names = [
        f"model.layers.{i}.{part}.weight"
        for i in range(2)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    gpt_names = [
        f"transformer.h.{i}.{part}.weight"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert [n for n, _ in build_model(TINY_LLAMA).hidden_matrices()] == llama_names
    assert [n for n, _ in build_model(TINY_GPT).hidden_matrices()] == gpt_names


def test_gpt_head_is_tied_and_counted_once() -> None:
    model = build_model(TINY_GPT)
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - (128 + 32) * 64


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@TINY
def test_init_weights_deterministic(cfg: ModelConfig) -> None:
    torch.manual_seed(1)
    first = build_model(cfg)
    torch.manual_seed(1)
    second = build_model(cfg)
    assert same_weights(first, second)
    for model in (first, second):
        torch.manual_seed(2)
        model.init_weights()
    assert same_weights(first, second)
    assert not same_weights(first, build_model(cfg))
    norm = first.model.norm.weight if cfg.model_type == "llama" else first.transformer.ln_f.weight
    assert torch.equal(norm, torch.ones_like(norm))


@TINY
def test_meta_build_then_materialize(cfg: ModelConfig) -> None:
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    loss = model(torch.randint(0, cfg.vocab_size, (2, 8)), torch.randint(0, cfg.vocab_size, (2, 8)))
    assert torch.isfinite(loss)


def test_build_from_omegaconf() -> None:
    node = OmegaConf.structured(TINY_LLAMA)
    assert isinstance(build_model(node), Llama)
    assert isinstance(build_model(OmegaConf.create(vars(TINY_GPT))), GPT)


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="model_type"):
        build_model(ModelConfig(model_type="mamba"))
    with pytest.raises(ValueError, match="intermediate_size"):
        build_model(ModelConfig(model_type="llama", intermediate_size=None))
    with pytest.raises(ValueError, match="block_size"):
        build_model(TINY_GPT)(torch.zeros(1, 33, dtype=torch.long))


@TINY
def test_activation_checkpointing_recomputes_blocks_bit_for_bit(cfg: ModelConfig) -> None:
    """recipe.training_params.activation_checkpointing: the same loss and gradients, the same
    parameter names, and the backward pass keeps fewer saved activations."""
    from types import SimpleNamespace

    from muonq.train.distributed import DistInfo
    from muonq.train.parallelize import parallelize

    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    single = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    results = {}
    for on in (False, True):
        model = perturbed(cfg)
        train_model = parallelize(model, single, SimpleNamespace(activation_checkpointing=on, compile=False))
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = train_model(idx, idx)
        loss.backward()
        results[on] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = results[False], results[True]
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    assert saved1 < 0.5 * saved0, (saved0, saved1)
