"""Group quantization (4, 5, 8 bits): packing, the native kernels, layer accuracy, which width each layer gets,
and whole tiny models against their float selves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenloom import SamplingParams
from tokenloom.config import ConfigError
from tokenloom.llm import LLM
from tokenloom.models import ops
from tokenloom.models.layers.group_quant import (
    GroupQuantWeight,
    group_quant_matmul,
    pack_group_codes,
    pack_group_quant,
    unpack_group_quant,
)
from tokenloom.models.layers.linear import MergedLinear
from tokenloom.models.layers.quantized import GroupQuantLinear, QuantizedLMHead
from tokenloom.models.quantize import quantize_model


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 9, 40])
def test_8_bit_layers_multiply_the_stored_weights_with_unrounded_activations(dtype, rows):
    """8 bits is the accurate width: its kernel takes float activations, so the product equals the dequantized
    matrix's to float rounding, in both regimes (the kernel for decode-sized steps, dense GEMM above)."""
    torch.manual_seed(0)
    packed = pack_group_quant(torch.randn(96, 256) * 0.05, 8)
    bias = torch.randn(96)
    x = torch.randn(rows, 256, dtype=dtype)
    got = GroupQuantLinear(packed, bias)(x)
    assert got.dtype == dtype and got.shape == (rows, 96)
    want = x.float() @ unpack_group_quant(packed).t() + bias
    assert _relative_error(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_merged_linear_keeps_its_shards_when_quantized():
    merged = MergedLinear(64, {"q_proj": 16, "k_proj": 8, "v_proj": 8})
    nn.init.normal_(merged.weight)
    quantized = quantize_model(_Wrapper(merged), "int8").proj
    assert isinstance(quantized, GroupQuantLinear) and quantized.bits == 8
    q, k, v = quantized.split(quantized(torch.randn(3, 64)))
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (16, 8, 8)


@pytest.mark.parametrize("bits,tol", [(8, 0.006), (5, 0.06), (4, 0.15)])
def test_lm_head_is_quantized_for_few_rows_and_dense_for_many(bits, tol):
    torch.manual_seed(2)
    dense = nn.Linear(64, 512, bias=False)
    head = QuantizedLMHead(dense, pack_group_quant(dense.weight, bits))
    limit = max(ops.group_quant_max_rows(), ops.group_quant_max_rows(tiled=True))
    few, many = torch.randn(2, 64), torch.randn(max(limit, 8) + 1, 64)
    assert _relative_error(head(few), dense(few)) < tol
    assert torch.equal(head(many), dense(many))


@pytest.mark.parametrize("bits,max_error", [(4, 0.09), (5, 0.045), (8, 0.006)])
def test_group_quant_weights_dequantize_to_within_half_a_step(bits, max_error):
    torch.manual_seed(3)
    w = torch.randn(16, 128)
    packed = pack_group_quant(w, bits)
    assert packed.bits == bits
    deq = unpack_group_quant(packed)
    step = packed.d.float().reshape(16, -1).repeat_interleave(32, dim=1)  # [16, 128] scale of each weight
    # The fitted range may clip a group's extremes; everything else lies within half a step.
    inside = (deq - w).abs() <= step / 2 + 1e-3
    assert inside.float().mean() > 0.97
    assert ((deq - w).norm() / w.norm()).item() < max_error


@pytest.mark.parametrize("bits", [4, 5])
def test_group_quant_fit_is_no_worse_than_plain_min_max(bits):
    torch.manual_seed(5)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    groups = w.reshape(-1, 32)
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    levels = (1 << bits) - 1
    scale = (high - low) / levels
    plain = ((groups - low) / scale).round().clamp(0, levels) * scale + low
    fitted = unpack_group_quant(pack_group_quant(w, bits)).reshape(-1, 32)
    assert (fitted - groups).square().sum() < (plain - groups).square().sum()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_native_packing_matches_the_torch_one(kernels, bits):
    torch.manual_seed(7)
    w = torch.randn(96, 320 // 64 * 64) * torch.rand(96, 1)
    native = pack_group_quant(w, bits)
    with ops.use_level("torch"):
        reference = pack_group_quant(w, bits)
    # Same fit; float summation order may flip a near-tie between two candidate ranges here and there.
    assert (native.codes == reference.codes).float().mean() > (0.97 if bits == 8 else 0.99)
    if bits == 5:
        assert (native.high == reference.high).float().mean() > 0.98
    close = torch.isclose(unpack_group_quant(native), unpack_group_quant(reference), rtol=1e-2, atol=1e-3)
    assert close.float().mean() > 0.98
    err = [((unpack_group_quant(p) - w).norm() / w.norm()).item() for p in (native, reference)]
    # The native dequantization (what large steps multiply) is the torch one, in every dtype.
    for dtype in (torch.float32, torch.bfloat16):
        fast = unpack_group_quant(native, dtype)
        with ops.use_level("torch"):
            assert torch.equal(fast, unpack_group_quant(native, dtype))
    assert err[0] == pytest.approx(err[1], rel=0.01)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 19])  # 19: passes of 8 rows and a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_group_quant_kernel_matches_the_dequantized_product(kernels, rows, dtype, bits):
    torch.manual_seed(6)
    packed = pack_group_quant(torch.randn(83, 192) * 0.05, bits)  # 83: rows in fours and a tail
    x, bias = torch.randn(rows, 192).to(dtype), torch.randn(83)
    want = x.float() @ unpack_group_quant(packed).t() + bias
    got = kernels.gq_linear(x, packed.codes, packed.d, packed.m, packed.high, bias)
    assert got.dtype == dtype and got.shape == (rows, 83)
    # 4 and 5 bits: the kernel quantizes activations to int8 per group of 32, a few per mille; 8 bits: none.
    assert _relative_error(got, want) < (0.01 if bits < 8 or dtype == torch.bfloat16 else 1e-6)
    if rows <= ops.group_quant_max_rows():  # the layers run the kernel; the scalar (portable) loop is left to tests
        assert torch.equal(group_quant_matmul(x, packed, bias), got)
    # Each row's result is independent of the other rows in the call.
    alone = torch.cat([kernels.gq_linear(x[i:i + 1], *packed, bias) for i in range(rows)])
    assert torch.equal(alone, got)


def test_group_quant_kernel_rejects_bad_shapes(kernels):
    packed = pack_group_quant(torch.randn(16, 128))
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernels.gq_linear(torch.randn(1, 96), packed.codes, packed.d, packed.m)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, K\]"):
        kernels.gq_linear(torch.randn(128), packed.codes, packed.d, packed.m)
    with pytest.raises(RuntimeError, match="high must be"):
        kernels.gq_linear(torch.randn(1, 128), packed.codes, packed.d, packed.m, packed.codes)
    eight = pack_group_quant(torch.randn(16, 128), 8)
    with pytest.raises(RuntimeError, match="8-bit codes take no high bits"):
        kernels.gq_linear(torch.randn(1, 128), eight.codes, eight.d, eight.m, packed.codes)
    with pytest.raises(ValueError, match="4, 5 or 8 bits"):
        pack_group_quant(torch.randn(16, 128), 3)


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("bits", [4, 5])
def test_group_quant_linear_is_close_to_the_float_layer(rows, bits):
    torch.manual_seed(4)
    dense = nn.Linear(128, 48, bias=True)
    x = torch.randn(rows, 128)  # 9 rows: the kernel's passes or the dequantized matrix, by level
    assert _relative_error(GroupQuantLinear(pack_group_quant(dense.weight, bits), dense.bias)(x), dense(x)) < 0.15


class _Wrapper(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.lm_head = nn.Linear(32, 10, bias=False)


@pytest.mark.parametrize("method,tol", [("int8", 0.01), ("int5", 0.15), ("int4", 0.3)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])  # untied; tied; Gemma norms; Conv1D
def test_quantized_model_logits_stay_close_to_float(arch, method, tol, tiny_models):
    prompts = [[5, 17, 42, 99, 7, 3, 250], [11, 12, 13]]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    dense = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01)
    quant = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, quantization=method)
    assert quant.engine.loaded.weight_bytes < dense.engine.loaded.weight_bytes * 1.5
    model = quant.engine.loaded.model
    layers = [m for m in model.modules() if isinstance(m, GroupQuantLinear)]
    assert layers and isinstance(model.lm_head, QuantizedLMHead)
    assert {m.bits for m in layers} == {model.lm_head.bits} == {int(method[3:])}  # HF weights: all fitted
    unquantized = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert unquantized in ([], [model.lm_head.dense])  # an untied head keeps its matrix for large steps
    for d, q in zip(dense.generate(prompts, params, use_tqdm=False), quant.generate(prompts, params, use_tqdm=False)):
        want = torch.tensor([lp[t].logprob for lp, t in zip(d.prompt_logprobs[1:], d.prompt_token_ids[1:])])
        got = torch.tensor([lp[t].logprob for lp, t in zip(q.prompt_logprobs[1:], q.prompt_token_ids[1:])])
        assert (got - want).abs().max() < tol, f"{arch}: prompt logprobs moved by {(got - want).abs().max()}"


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="quantization must be one of"):
        LLM("gemma-3-270m", quantization="int3")


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_group_quant_matmul_without_the_kernel_is_the_dequantized_product(bits):
    torch.manual_seed(8)
    packed = pack_group_quant(torch.randn(48, 128) * 0.05, bits)
    x, bias = torch.randn(3, 128).bfloat16(), torch.randn(48)
    with ops.use_level("torch"):
        got = group_quant_matmul(x, packed, bias)
    assert got.dtype == torch.bfloat16
    want = x.float() @ unpack_group_quant(packed).t() + bias
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert group_quant_matmul(x, packed, float_out=True).dtype == torch.float32


class _StoredBlocks:
    """An `ExactWeights` over made-up stored codes: each name's codes, scales and minimums at a width."""

    def __init__(self, widths: dict[str, int], rows: dict[str, int], k: int) -> None:
        gen = torch.Generator().manual_seed(9)
        self.widths, self.stored = widths, {}
        for name, bits in widths.items():
            codes = torch.randint(0, 1 << bits, (rows[name], k), generator=gen, dtype=torch.uint8)
            d = (torch.rand(rows[name], k // 32, generator=gen) * 0.01).half()
            m = (-d.float() * (1 << (bits - 1))).half()
            self.stored[name] = (codes, d, m)
        self.packed: list[tuple[str, int]] = []

    def value(self, name: str) -> torch.Tensor:
        codes, d, m = self.stored[name]
        return (codes.float().view(codes.shape[0], -1, 32) * d.float()[..., None] + m.float()[..., None]).flatten(1)

    def native_bits(self, name: str) -> int | None:
        return self.widths.get(name)

    def pack(self, name: str, bits: int) -> GroupQuantWeight:
        self.packed.append((name, bits))
        return pack_group_codes(*self.stored[name], bits)


@pytest.mark.parametrize("method,qkv_bits,repacked", [
    ("int4", 5, {("q_proj.weight", 5), ("k_proj.weight", 5)}),  # Q5 kept, Q8 v fitted at 5
    ("int5", 5, {("q_proj.weight", 5), ("k_proj.weight", 5)}),
    ("int8", 8, {("q_proj.weight", 8), ("k_proj.weight", 8), ("v_proj.weight", 8),
                 ("lm_head.weight", 8)}),  # every stored format repacked exactly at 8 bits
])
def test_stored_blocks_are_repacked_not_refitted(method, qkv_bits, repacked):
    rows = {"q_proj.weight": 32, "k_proj.weight": 16, "v_proj.weight": 16, "lm_head.weight": 10}
    stored = _StoredBlocks({"q_proj.weight": 5, "k_proj.weight": 5, "v_proj.weight": 8,
                            "lm_head.weight": 8}, rows, 64)
    wrapper = _Wrapper(MergedLinear(64, {"q_proj": 32, "k_proj": 16, "v_proj": 16}))
    wrapper.lm_head = nn.Linear(64, 10, bias=False)
    with torch.no_grad():  # the float weights a loader would have filled: the stored values
        wrapper.proj.weight.copy_(torch.cat([stored.value(f"{s}.weight") for s in ("q_proj", "k_proj", "v_proj")]))
        wrapper.lm_head.weight.copy_(stored.value("lm_head.weight"))
    model = quantize_model(wrapper, method, stored)  # a merged layer's shards are named beside it
    assert set(stored.packed) == repacked
    assert model.proj.bits == qkv_bits and model.lm_head.bits == int(method[3:])
    weights = unpack_group_quant(model.proj.packed)
    for name, (start, width) in model.proj.shard_offsets.items():
        if (f"{name}.weight", qkv_bits) in repacked:
            assert torch.equal(weights[start:start + width], stored.value(f"{name}.weight"))


@pytest.mark.parametrize("rows", [64, 83])  # 83: the last tile padded
def test_row_tiles_hold_the_same_weight_and_give_the_same_products(kernels, rows):
    from tokenloom.models.layers.group_quant import tile_group_quant, untile_group_quant

    torch.manual_seed(10)
    packed = pack_group_quant(torch.randn(rows, 192) * 0.05, 4)
    tiled = tile_group_quant(packed)
    assert tiled.tiles.shape == (-(-rows // 16), 192 // 8, 64)
    assert all(torch.equal(a, b) for a, b in zip(untile_group_quant(tiled, rows)[:3], packed[:3]))
    x = torch.randn(11, 192).bfloat16()  # passes of kTileRows rows and a tail
    got = kernels.gq_tiles_linear(x, *tiled)[:, :rows]
    # The same int8-activation arithmetic as gq_linear, summed in another order.
    torch.testing.assert_close(got, kernels.gq_linear(x, *packed, None, True), rtol=1e-5, atol=1e-5)
    alone = torch.cat([kernels.gq_tiles_linear(x[i:i + 1], *tiled)[:, :rows] for i in range(11)])
    assert torch.equal(alone, got)  # a row's logits do not depend on the other rows of the step


@pytest.mark.parametrize("rows", [64, 83])
def test_5_bit_row_tiles_hold_the_same_weight_and_give_the_same_products(kernels, rows):
    from tokenloom.models.layers.group_quant import tile_group_quant, untile_group_quant

    if not kernels.gq_tiles_high_supported():
        pytest.skip("no 5-bit row tiles at this level")
    torch.manual_seed(13)
    packed = pack_group_quant(torch.randn(rows, 192) * 0.05, 5)
    tiled = tile_group_quant(packed)
    assert tiled.high.shape == (-(-rows // 16), 192 // 8, 16)
    back = untile_group_quant(tiled, rows)
    assert all(torch.equal(a, b) for a, b in zip(back, packed))
    x = torch.randn(70, 192)  # more rows than a pass of the few-rows kernel: avx2's many-rows kernel
    got = kernels.gq_tiles_linear(x, *tiled)[:, :rows]
    torch.testing.assert_close(got, kernels.gq_linear(x, *packed, None, True), rtol=1e-5, atol=1e-5)
    # A row's outputs do not depend on the other rows, nor on which kernel the step's size picked.
    for size in (1, 3, 5, 70):
        assert torch.equal(kernels.gq_tiles_linear(x[:size], *tiled)[:, :rows], got[:size])


@pytest.mark.parametrize("bits", [4, 5])
def test_many_rows_of_tiles_sum_like_a_few(kernels, bits):
    """Steps of any size give each row the same bits as one row alone (prefill and decode agree)."""
    from tokenloom.models.layers.group_quant import tile_group_quant

    if bits == 5 and not kernels.gq_tiles_high_supported():
        pytest.skip("no 5-bit row tiles at this level")
    torch.manual_seed(14)
    tiled = tile_group_quant(pack_group_quant(torch.randn(48, 640) * 0.05, bits))
    x = torch.randn(150, 640)  # two full blocks of 64 rows and a tail
    many = kernels.gq_tiles_linear(x, *tiled)
    alone = torch.cat([kernels.gq_tiles_linear(x[i:i + 1], *tiled) for i in range(0, 150, 7)])
    assert torch.equal(alone, many[::7])


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_layers_are_tiled_where_the_level_says_and_compute_the_same_product(kernels, bits):
    torch.manual_seed(15)
    dense = nn.Linear(128, 83)  # 83 outputs: the last tile padded; a bias
    packed = pack_group_quant(dense.weight, bits)
    layer = GroupQuantLinear(packed, dense.bias)
    assert layer.tiled == (ops.tiled_layers() and bits != 8)
    assert all(torch.equal(a, b) for a, b in zip(layer.packed[:3], packed[:3]))
    for rows in (1, 9, 100):
        x = torch.randn(rows, 128)
        want = x @ unpack_group_quant(packed).t() + dense.bias
        got = layer(x)
        assert got.shape == (rows, 83) and got.dtype == torch.float32
        assert _relative_error(got, want) < 0.02  # int8 activations on the kernels' paths
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_avx2_keeps_layers_in_row_tiles():
    if "avx2" not in ops.isa.supported_levels() or not ops.describe()["kernels"]:
        pytest.skip("no avx2 kernels here (CPU or TOKENLOOM_KERNELS=0)")
    with ops.use_level("avx2"):
        assert ops.tiled_layers() and ops.group_quant_max_rows(tiled=True) >= 2048
        layer = GroupQuantLinear(pack_group_quant(torch.randn(32, 64), 5), None)
        assert layer.tiled and layer.high.shape == (2, 8, 16) and "row tiles" in repr(layer)


def test_a_4_bit_head_runs_on_row_tiles(kernels):
    if not kernels.gq_linear_native():
        pytest.skip("row tiles need the vectorised kernels")
    torch.manual_seed(11)
    dense = nn.Linear(128, 200, bias=False)
    packed = pack_group_quant(dense.weight, 4)
    head = QuantizedLMHead(dense, packed)
    assert head.tiled and all(torch.equal(a, b) for a, b in zip(head.packed[:3], packed[:3]))
    x = torch.randn(3, 128)
    torch.testing.assert_close(head(x), group_quant_matmul(x, packed, float_out=True), rtol=1e-5, atol=1e-5)
    assert head(x).shape == (3, 200)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_vocab_projection_of_a_few_rows_is_float32_and_exactly_summed(kernels, rows):
    """The few-rows kernel sums bf16 products in float32 (torch's bf16 GEMM rounds each logit to bf16)."""
    from tokenloom.models.layers.linear import LMHead, vocab_projection

    if not kernels.dense_rows_supported(torch.bfloat16, torch.bfloat16):
        pytest.skip("no vectorised few-rows kernel at this level")
    torch.manual_seed(12)
    weight, x = torch.randn(83, 96).bfloat16(), torch.randn(rows, 96).bfloat16()
    got = vocab_projection(x, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ weight.float().t(), rtol=1e-5, atol=1e-5)
    alone = torch.cat([vocab_projection(x[i:i + 1], weight) for i in range(rows)])
    assert torch.equal(alone, got)
    head = LMHead(96, 83).bfloat16()
    head.weight.data.copy_(weight)
    assert torch.equal(head(x), got)
    many = torch.randn(9, 96).bfloat16()  # above the kernel's rows: torch's GEMM, in bf16
    assert vocab_projection(many, weight).dtype == torch.bfloat16


def test_bf16_linear_layers_of_a_few_rows_take_the_native_kernel(kernels):
    from tokenloom.models.layers.linear import Linear, MergedLinear

    if not kernels.dense_rows_supported(torch.bfloat16, torch.bfloat16):
        pytest.skip("no vectorised few-rows kernel at this level")
    torch.manual_seed(13)
    layer = Linear(64, 40, bias=True).bfloat16()
    x = torch.randn(2, 3, 64).bfloat16()  # 6 rows in a 3-d batch
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 40)
    want = (x.float() @ layer.weight.float().t() + layer.bias.float()).bfloat16()  # float sums, one rounding
    assert torch.equal(got, want)
    merged = MergedLinear(64, {"gate_proj": 24, "up_proj": 24}).bfloat16()
    gate, up = merged.split(merged(x[0]))
    assert gate.shape == up.shape == (3, 24)
    many = torch.randn(20, 64).bfloat16()  # more rows than decode: torch's GEMM
    torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, layer.weight, layer.bias))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("k", [64, 640])
def test_few_rows_dense_kernel_sums_in_float32_independently_of_the_other_rows(kernels, x_dtype, w_dtype, k):
    """float32 weights (torch's GEMV streams them at half the bandwidth), bf16 weights with float32
    activations (the default on CPUs without native bf16) and bf16 x bf16."""
    if not kernels.dense_rows_supported(x_dtype, w_dtype):
        pytest.skip(f"no vectorised {x_dtype} x {w_dtype} kernel at this level")
    torch.manual_seed(14)
    weight, bias = torch.randn(83, k).to(w_dtype), torch.randn(83)  # 83 rows: fours and a tail
    for rows in range(1, 9):
        x = torch.randn(rows, k).to(x_dtype)
        got = kernels.dense_rows_linear(x, weight, bias, True)
        assert got.dtype == torch.float32 and got.shape == (rows, 83)
        want = x.double() @ weight.double().t() + bias.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        alone = torch.cat([kernels.dense_rows_linear(x[i:i + 1], weight, bias, True) for i in range(rows)])
        assert torch.equal(alone, got)
        assert kernels.dense_rows_linear(x, weight, bias, False).dtype == x_dtype
