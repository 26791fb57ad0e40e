"""Precision check: transformers' Glm4MoeForCausalLM vs our Megatron-Core model on the same chat tokens.

Two modes, same report:
- full: both whole models run end to end; per-layer hidden states are captured with hooks.
- layerwise: one decoder layer at a time on both sides, fed the same (HF) input, then freed; memory is one
  layer plus embeddings, the route to checking the 355B model on a CPU machine.
The MTP layer is checked against its formula (hf_reference.mtp_logits), since transformers has no MTP forward.
FP8 checkpoints are compared against their dequantised weights (fp8.py), layerwise: transformers cannot run them
on CPU, and the HF side of the layerwise check reads weights through our (dequantising) reader.

Thresholds (README "Precision"): fp32 max |logits diff| <= 1e-4 and per-layer max |hidden diff| <= 1e-4 on the
tiny models; bf16 compares mean |logits diff| <= 0.1 and argmax agreement >= 0.9 (kernels round and routing
ties break differently in bf16; ms-swift uses the same mean bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from glm45_train.convert.precision import hf_reference
from glm45_train.convert.sources import HFTensorSource, TensorSource, load_weights
from glm45_train.formats.fp8 import DequantisingReader
from glm45_train.model.hf_config import Glm45Config, to_transformer_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant. 你是一个细心的助手。"},
    {"role": "user", "content": "What is 17 * 23? 请一步一步算。"},
    {"role": "assistant", "reasoning_content": "17*23 = 17*20 + 17*3 = 340 + 51 = 391.", "content": "391"},
    {"role": "user", "content": "And 391 / 17?"},
]


@dataclass(frozen=True)
class Thresholds:
    logits_max: float | None = None
    logits_mean: float | None = None
    layer_max: float | None = None
    argmax_min: float = 0.0


THRESHOLDS = {
    "fp32": Thresholds(logits_max=1e-4, layer_max=1e-4, argmax_min=1.0),
    "bf16": Thresholds(logits_mean=0.1, argmax_min=0.9),
}


@dataclass(frozen=True)
class Diff:
    name: str
    max_abs: float
    mean_abs: float

    @classmethod
    def of(cls, name: str, ours: torch.Tensor, reference: torch.Tensor) -> Diff:
        if ours.shape != reference.shape:
            raise ValueError(f"{name}: shape {tuple(ours.shape)} vs reference {tuple(reference.shape)}")
        delta = (ours.float() - reference.float()).abs()
        return cls(name, delta.max().item(), delta.mean().item())


@dataclass
class PrecisionReport:
    dtype: str
    mode: str
    tokens: int
    logits: Diff
    argmax_agreement: float
    layers: list[Diff] = field(default_factory=list)
    mtp: Diff | None = None

    @property
    def thresholds(self) -> Thresholds:
        return THRESHOLDS[self.dtype]

    def failures(self) -> list[str]:
        t, out = self.thresholds, []
        for diff in [self.logits, *([self.mtp] if self.mtp else [])]:
            if t.logits_max is not None and diff.max_abs > t.logits_max:
                out.append(f"{diff.name}: max |diff| {diff.max_abs:.3g} > {t.logits_max:g}")
            if t.logits_mean is not None and diff.mean_abs > t.logits_mean:
                out.append(f"{diff.name}: mean |diff| {diff.mean_abs:.3g} > {t.logits_mean:g}")
        if t.layer_max is not None:
            out += [
                f"{d.name}: max |diff| {d.max_abs:.3g} > {t.layer_max:g}"
                for d in self.layers
                if d.max_abs > t.layer_max
            ]
        if self.argmax_agreement < t.argmax_min:
            out.append(f"argmax agreement {self.argmax_agreement:.4f} < {t.argmax_min:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def format(self) -> str:
        lines = [f"precision check ({self.mode}, {self.dtype}, {self.tokens} tokens)"]
        lines += [f"  {d.name:<28} max {d.max_abs:.3e}  mean {d.mean_abs:.3e}" for d in self.layers]
        lines.append(f"  {'logits':<28} max {self.logits.max_abs:.3e}  mean {self.logits.mean_abs:.3e}")
        if self.mtp:
            lines.append(f"  {'mtp logits':<28} max {self.mtp.max_abs:.3e}  mean {self.mtp.mean_abs:.3e}")
        lines.append(f"  argmax agreement {self.argmax_agreement:.4f}")
        failures = self.failures()
        lines.append("PASS" if not failures else "FAIL: " + "; ".join(failures))
        return "\n".join(lines)


def sample_tokens(tokenizer_dir: str | Path) -> torch.Tensor:
    """[1, seq] ids of the sample conversation rendered with the tokenizer's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def check(
    hf_dir: str | Path,
    source: TensorSource,
    *,
    dtype: str = "fp32",
    layerwise: bool = False,
    input_ids: torch.Tensor | None = None,
) -> PrecisionReport:
    """Compare the HF checkpoint at `hf_dir` with a Megatron model filled from `source` (see convert/sources.py)."""
    from glm45_train.runtime import distributed

    distributed.initialize()
    ids = sample_tokens(hf_dir) if input_ids is None else input_ids
    run = _compare_layerwise if layerwise or _is_fp8(Path(hf_dir)) else _compare_full
    return run(Path(hf_dir), source, ids, dtype)


def _is_fp8(hf_dir: Path) -> bool:
    return isinstance(HFTensorSource(hf_dir).reader, DequantisingReader)


def _megatron_model(hf: Glm45Config, dtype: str, meta: bool):
    from glm45_train.model.build import build_model

    config = to_transformer_config(hf, params_dtype=DTYPES[dtype], perform_initialization=False)
    return build_model(hf, config, device="meta" if meta else None).eval()


def _first(out):
    """Megatron layers return (hidden_states, context); hooks and callers want the hidden states."""
    return out[0] if isinstance(out, tuple) else out


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous()


@torch.no_grad()
def _compare_full(hf_dir: Path, source: TensorSource, ids: torch.Tensor, dtype: str) -> PrecisionReport:
    from transformers import AutoModelForCausalLM

    from glm45_train.model.forward import logits as megatron_logits

    torch_dtype = DTYPES[dtype]
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="eager").eval()
    ref_hidden: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: ref_hidden.append(out)) for layer in reference.model.layers
    ]
    ref_out = reference(ids, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    final_hidden = ref_out.hidden_states[-1]

    model = _megatron_model(source.hf, dtype, meta=False)
    load_weights(model, source)
    ours_hidden: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: ours_hidden.append(_seq_first(_first(out))))
        for layer in model.decoder.layers
    ]
    ours = megatron_logits(model, ids)
    for hook in hooks:
        hook.remove()
    layers = [Diff.of(f"layer {i}", o, r) for i, (o, r) in enumerate(zip(ours_hidden, ref_hidden, strict=True))]
    mtp = _mtp_diff(hf_dir, model, ids, final_hidden, torch_dtype) if model.config.mtp_num_layers else None
    return PrecisionReport(
        dtype=dtype,
        mode="full",
        tokens=ids.numel(),
        logits=Diff.of("logits", ours, ref_out.logits),
        argmax_agreement=(ours.argmax(-1) == ref_out.logits.argmax(-1)).float().mean().item(),
        layers=layers,
        mtp=mtp,
    )


def _mtp_diff(hf_dir: Path, model, ids: torch.Tensor, final_hidden: torch.Tensor, dtype: torch.dtype) -> Diff:
    """Run Megatron's MTP path (it needs labels) and capture its hidden state before the shared head."""
    captured: list[torch.Tensor] = []
    hook = model.mtp.layers[0].register_forward_hook(lambda _m, _i, out: captured.append(_first(out)))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    model(ids, positions, None, labels=ids)
    hook.remove()
    ours_logits, _ = model.output_layer(captured[0])
    reference = hf_reference.mtp_logits(
        hf_reference.hf_model_config(hf_dir), HFTensorSource(hf_dir).reader, ids, final_hidden, dtype
    )
    return _mtp_logits_diff(_seq_first(ours_logits), reference)


def _mtp_logits_diff(ours: torch.Tensor, reference: torch.Tensor) -> Diff:
    # The last position has no next token: Megatron fills it with id 0, HF's formula wraps around; it is
    # never trained (loss mask rolled likewise), so it is left out of the comparison.
    return Diff.of("mtp logits", ours[:, :-1], reference[:, :-1])


@torch.no_grad()
def _compare_layerwise(hf_dir: Path, source: TensorSource, ids: torch.Tensor, dtype: str) -> PrecisionReport:
    """One layer in memory at a time: each Megatron layer is materialised, loaded, run on HF's input, freed."""
    import torch.nn.functional as F

    torch_dtype = DTYPES[dtype]
    config = hf_reference.hf_model_config(hf_dir)
    reader = HFTensorSource(hf_dir).reader
    model = _megatron_model(source.hf, dtype, meta=True)
    rope = model.rotary_pos_emb(ids.shape[1])
    hidden = F.embedding(ids, reader.get("model.embed_tokens.weight").to(torch_dtype))
    layers = []
    for index, layer in enumerate(model.decoder.layers):
        reference = hf_reference.decoder_layer(config, reader, index, torch_dtype)
        expected = hf_reference.run_layer(reference, hidden, config)
        del reference
        layer.to_empty(device="cpu")
        load_weights(layer, source, prefix=f"decoder.layers.{index}.")
        ours, _ = layer(hidden_states=_seq_first(hidden), attention_mask=None, rotary_pos_emb=rope)
        layer.to_empty(device="meta")
        layers.append(Diff.of(f"layer {index}", _seq_first(ours), expected))
        hidden = expected
    eps = config.rms_norm_eps
    final_hidden = hf_reference.rms_norm(hidden, reader.get("model.norm.weight").to(torch_dtype), eps)
    ref_logits = F.linear(final_hidden, reader.get("lm_head.weight").to(torch_dtype))
    for part, prefix in (
        (model.decoder.final_layernorm, "decoder.final_layernorm."),
        (model.output_layer, "output_layer."),
    ):
        part.to_empty(device="cpu")
        load_weights(part, source, prefix=prefix)
    ours_logits, _ = model.output_layer(model.decoder.final_layernorm(_seq_first(hidden)))
    ours_logits = _seq_first(ours_logits)
    return PrecisionReport(
        dtype=dtype,
        mode="layerwise",
        tokens=ids.numel(),
        logits=Diff.of("logits", ours_logits, ref_logits),
        argmax_agreement=(ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        layers=layers,
        mtp=_mtp_diff_layerwise(hf_dir, model, source, ids, final_hidden, torch_dtype)
        if model.config.mtp_num_layers
        else None,
    )


def _mtp_diff_layerwise(hf_dir, model, source, ids, final_hidden, dtype) -> Diff:
    model.embedding.to_empty(device="cpu")
    load_weights(model.embedding, source, prefix="embedding.")
    mtp_layer = model.mtp.layers[0]
    mtp_layer.to_empty(device="cpu")
    load_weights(mtp_layer, source, prefix="mtp.layers.0.")
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    hidden = mtp_layer(
        input_ids=ids,
        position_ids=positions,
        hidden_states=_seq_first(final_hidden),
        attention_mask=None,
        rotary_pos_emb=model.rotary_pos_emb(ids.shape[1]),
        embedding=model.embedding,
    )
    ours_logits, _ = model.output_layer(_first(hidden))
    reference = hf_reference.mtp_logits(
        hf_reference.hf_model_config(hf_dir), HFTensorSource(hf_dir).reader, ids, final_hidden, dtype
    )
    return _mtp_logits_diff(_seq_first(ours_logits), reference)
