"""The denoising viewer: the page's embedded JSON replays exactly the decode's trace (plain samplers, WINO with
re-masking, block diffusion with rows stopping, CoDD), and the page is self-contained."""

import json
import re

import pytest
import torch

from conftest import make_model, with_codd_prior
from loopdlm.diffusion.masked import DiffusionConfig
from loopdlm.eval.denoising_viewer import continuation_document, embedded_document, trace_document, viewer_html
from loopdlm.sampling import SamplerConfig, build_decoder, prompt_canvas
from loopdlm.sampling.codd import HMMPrior
from loopdlm.sampling.engine import DecodeTrace
from loopdlm.sampling.long_generation import generate_long

VOCAB, MASK, PAD = 23, 0, 1


class PieceTokenizer:
    """Ids as letters, enough for the viewer's pieces."""

    mask_id = MASK

    def decode(self, ids, skip_special=True):
        return "".join("<|mask|>" if i == MASK else chr(ord("a") + i) for i in ids)


def page_document(document):
    """Write the page and read its embedded JSON back, as a browser would."""
    html = viewer_html(document)
    page_without_data = re.sub(r'id="trace-data">.*?</script>', "", html, flags=re.DOTALL)
    assert not re.search(r"<script[^>]+src=|<link|<img|@import|url\(|https?://", page_without_data)
    return embedded_document(html)


def replay(document):
    """Canvas of every row before the first step and after each step (None = padding), per the page's rules."""
    rows = [list(row) for row in document["rows"]]
    states = [[list(row) for row in rows]]
    for step in document["steps"]:
        for row, entry in zip(rows, step["rows"]):
            if entry is None:
                continue
            row.extend([document["mask_id"]] * step["append"])
            for column, token, _ in entry["commit"]:
                row[column] = token
            for column in entry["remask"]:
                row[column] = document["mask_id"]
        states.append([list(row) for row in rows])
    return states


def assert_page_equals_trace(document, blocks):
    """blocks: [(original row indices, DecodeTrace)] in decode order; checks every step of every active row."""
    states = replay(document)
    index = 0
    for rows, trace in blocks:
        for step in trace.steps:
            index += 1
            page_step = document["steps"][index - 1]
            assert page_step["loops"] == step.loops and page_step["forward_pass"] == step.forward_pass
            assert page_step["window"] == [step.window.start, step.window.stop]
            assert [r for r, e in enumerate(page_step["rows"]) if e is not None] == sorted(rows)
            for local, row in enumerate(rows):
                expected = step.tokens[local].tolist()
                shown = states[index][row]
                assert len(shown) == len(expected)
                assert [t for t in shown if t is not None] == [t for t, s in zip(expected, shown) if s is not None]
                entry = page_step["rows"][row]
                assert [c for c, _, _ in entry["commit"]] == step.committed[local].nonzero().flatten().tolist()
                assert [conf for _, _, conf in entry["commit"]] == \
                    step.confidence[local][step.committed[local]].tolist()
                assert entry["remask"] == step.remasked[local].nonzero().flatten().tolist()
                assert entry["core"] == float(step.core_applications[local])
    assert index == len(document["steps"])


def plain_decode(spec):
    model = make_model(vocab_size=VOCAB)
    canvas = prompt_canvas([[5, 6, 7], [8]], 16, MASK, PAD)
    result = build_decoder(model, None, spec, MASK).fill(canvas, torch.Generator().manual_seed(0), record_trace=True)
    document = page_document(trace_document(result.trace, PieceTokenizer(), canvas == PAD, {"title": "t"}))
    return result, document, canvas


@pytest.mark.parametrize("spec", [SamplerConfig.from_flags("topk", steps=5, loops=2),
                                  SamplerConfig.from_flags("ancestral", steps=6),
                                  SamplerConfig.from_flags("threshold", threshold=0.2, block_length=4, loops=3)])
def test_page_of_a_plain_sampler_equals_its_trace(spec):
    result, document, canvas = plain_decode(spec)
    assert document["rows"][1][:2] == [None, None] and document["rows"][0][:3] == [5, 6, 7]  # padding hidden
    assert_page_equals_trace(document, [([0, 1], result.trace)])
    assert replay(document)[-1][0] == result.tokens[0].tolist()
    blocks = [s["block"] for s in document["steps"]]
    assert blocks[0] == 0 and blocks[-1] == (3 if spec.block_length == 4 else 0) and blocks == sorted(blocks)
    shown = result.tokens[canvas != PAD].unique().tolist() + [MASK]
    assert set(document["pieces"]) == {str(t) for t in shown}


def test_page_of_wino_marks_its_re_masks():
    spec = SamplerConfig.from_flags("wino", steps=16, loops=2, tau1=0.05, tau2=0.99, wino_min_accept=2, temperature=1.0)
    result, document, _ = plain_decode(spec)
    assert result.stats.remasked > 0
    assert_page_equals_trace(document, [([0, 1], result.trace)])
    remasks = sum(len(e["remask"]) for s in document["steps"] for e in s["rows"])
    assert remasks == result.stats.remasked


def one_state_prior():
    prior = HMMPrior(1, VOCAB)
    with torch.no_grad():
        prior.emit_logits.add_(torch.randn(1, VOCAB))
    return prior.requires_grad_(False)


@pytest.mark.parametrize("any_order", [False, True])
def test_page_of_codd_sampling_equals_its_trace(any_order, tmp_path):
    spec = with_codd_prior(SamplerConfig.from_flags("topk", steps=4, loops=2), one_state_prior(), tmp_path, window=16,
                           codd_gamma=1.5, codd_any_order=any_order)
    result, document, _ = plain_decode(spec)
    assert_page_equals_trace(document, [([0, 1], result.trace)])


class StopAt:
    """Stops row r once it has limits[r] tokens."""

    name = "limit"

    def __init__(self, limits):
        self.limits = limits

    def __call__(self, row, generated, new_from):
        return self.limits[row] if len(generated) >= self.limits[row] else None


def test_page_of_block_diffusion_shows_blocks_in_order_and_drops_stopped_rows():
    model = make_model(vocab_size=VOCAB)
    decoder = build_decoder(model, DiffusionConfig(block_size=4), SamplerConfig.from_flags("wino", tau1=0.3, loops=2),
                            MASK)
    result = generate_long(decoder, [[3], [4, 5, 6, 7, 8], [6]], max_length=12, stop=(StopAt([4, 100, 8]),),
                           steps_per_block=2,
                           generator=torch.Generator().manual_seed(0), record_trace=True)
    assert [t.rows for t in result.traces] == [[0, 1, 2], [1, 2], [1]]
    document = page_document(continuation_document(result, PieceTokenizer()))
    assert document["rows"][0] == [None] * 7 + [3] + [MASK] * 4  # prompt canvas of two blocks, then block 1
    assert_page_equals_trace(document, [(t.rows, t.trace) for t in result.traces])
    appends = [s["append"] for s in document["steps"] if s["append"]]
    assert appends == [4, 4]
    blocks = [s["block"] for s in document["steps"]]
    assert blocks == sorted(blocks) and blocks[-1] == 2
    final = replay(document)[-1]
    assert final[1][8:] == result.sequences[1] and final[0][8:12] == result.sequences[0]


def test_special_text_cannot_close_the_data_tag():
    class Nasty(PieceTokenizer):
        def decode(self, ids, skip_special=True):
            return "</script><b>x</b>"

    trace = DecodeTrace(torch.tensor([[4, MASK]]))
    decoder = build_decoder(make_model(vocab_size=VOCAB), None, SamplerConfig.from_flags("topk", steps=1), MASK)
    trace.steps = decoder.fill(trace.initial, record_trace=True).trace.steps
    document = trace_document(trace, Nasty())
    html = viewer_html(document)
    assert html.count("</script>") == 2  # the data tag and the script tag
    assert embedded_document(html) == json.loads(json.dumps(document))
