"""X-Omni sequence format: documents and masks against hand-written expectations, and the parser."""
import numpy as np
import pytest

from megatron_xomni.data.sequence import FormatError, SequenceFormat, build_generation, build_understanding, parse_image_sequence, qa_turns

TV, IV = 512, 256


@pytest.fixture()
def fmt():
    return SequenceFormat(text_vocab_size=TV, image_vocab_size=IV)


def test_generation_document(text_tok, fmt):
    t = text_tok
    codes = np.array([[5, 0, 255], [7, 1, 9]])  # h=2, w=3: raster order is row by row
    doc = build_generation(t, fmt, "a photo of a red circle", codes)
    caption = t.encode("a photo of a red circle")
    header = [t.som_id] + t.encode("2") + t.encode(" ") + t.encode("3") + [t.image_id]
    image = [512 + 5, 512 + 0, 512 + 255, 512 + 7, 512 + 1, 512 + 9]
    expected = caption + header + image + [t.eom_id, t.eos_id]
    expected_mask = [0] * len(caption) + [0] * len(header) + [1] * 6 + [1, 0]
    assert doc.ids.dtype == np.int32 and doc.mask.dtype == np.uint8
    assert doc.ids.tolist() == expected
    assert doc.mask.tolist() == expected_mask
    assert t.decode(doc.ids, TV) == ("a photo of a red circle<SOM>2 3<IMAGE><MM-Token-5><MM-Token-0><MM-Token-255>"
                                     "<MM-Token-7><MM-Token-1><MM-Token-9><EOM></s>")
    eos_fmt = SequenceFormat(text_vocab_size=TV, image_vocab_size=IV, supervise_eos_in_generation=True)
    assert build_generation(t, eos_fmt, "a photo of a red circle", codes).mask.tolist() == expected_mask[:-1] + [1]


def test_understanding_document(text_tok, fmt):
    t = text_tok
    codes = np.array([[3]])
    turns = [("Is there a circle?", "yes"), ("What color is the circle?", "red")]
    doc = build_understanding(t, fmt, codes, turns)
    parts = [  # (ids, supervised)
        ([t.som_id] + t.encode("1") + t.encode(" ") + t.encode("1") + [t.image_id], 0),
        ([512 + 3, t.eom_id], 0),
        (t.encode("Is there a circle? "), 0),
        (t.encode("yes"), 1),
        (t.encode("\nWhat color is the circle? "), 0),
        (t.encode("red"), 1),
        ([t.eos_id], 1),
    ]
    assert doc.ids.tolist() == [i for ids, _ in parts for i in ids]
    assert doc.mask.tolist() == [m for ids, m in parts for _ in ids]
    assert t.decode(doc.ids, TV) == ("<SOM>1 1<IMAGE><MM-Token-3><EOM>Is there a circle? yes\n"
                                     "What color is the circle? red</s>")


def test_qa_turns_from_meta(fmt):
    assert qa_turns({"qa": [["q1", "a1"], ["q2", "a2"]]}, "cap", fmt) == [("q1", "a1"), ("q2", "a2")]
    assert qa_turns({}, "a cat", fmt) == [("Describe the image.", "a cat")]
    one = SequenceFormat(text_vocab_size=TV, image_vocab_size=IV, max_qa_turns=1)
    assert qa_turns({"qa": [["q1", "a1"], ["q2", "a2"]]}, "cap", one) == [("q1", "a1")]
    with pytest.raises(FormatError, match="pairs"):
        qa_turns({"qa": [["only one"]]}, "cap", fmt)


def test_bad_documents(text_tok, fmt):
    with pytest.raises(FormatError, match="reserved token '<SOM>'"):
        build_generation(text_tok, fmt, "sneaky <SOM> caption", np.zeros((1, 1), int))
    with pytest.raises(FormatError, match=r"\[0, 256\)"):
        build_generation(text_tok, fmt, "cap", np.array([[256]]))
    with pytest.raises(FormatError, match="grid"):
        build_generation(text_tok, fmt, "cap", np.array([1, 2]))
    with pytest.raises(ValueError, match="text_vocab_size=100 is smaller"):
        build_generation(text_tok, SequenceFormat(text_vocab_size=100, image_vocab_size=IV), "cap", np.zeros((1, 1), int))
    with pytest.raises(FormatError, match="empty answer"):
        build_understanding(text_tok, fmt, np.zeros((1, 1), int), [("q", " ")])


def test_parse_round_trip(text_tok, fmt):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, IV, size=(3, 5))
    doc = build_generation(text_tok, fmt, "a photo of two squares", codes)
    parsed = parse_image_sequence(text_tok, fmt, doc.ids)
    assert parsed.text == "a photo of two squares"
    assert (parsed.height, parsed.width) == (3, 5)
    np.testing.assert_array_equal(parsed.codes, codes)
    assert parsed.rest == [text_tok.eos_id]


def test_parse_errors(text_tok, fmt):
    t = text_tok
    head = t.encode("cap") + [t.som_id] + t.encode("2 2") + [t.image_id]
    good = head + [TV + 1, TV + 2, TV + 3, TV + 4, t.eom_id]
    assert parse_image_sequence(t, fmt, good).codes.tolist() == [[1, 2], [3, 4]]
    cases = {
        "no <SOM>": t.encode("just text"),
        "no <IMAGE>": t.encode("cap") + [t.som_id] + t.encode("2 2"),
        "not 'h w'": t.encode("cap") + [t.som_id] + t.encode("2x2") + [t.image_id],
        "after 3 of the 2x2=4": head + [TV + 1, TV + 2, TV + 3],
        "image token 2 of 4 has id": head + [TV + 1, TV + 2, 7, TV + 4, t.eom_id],
        "expected <EOM>": head + [TV + 1, TV + 2, TV + 3, TV + 4, TV + 5],
    }
    for message, ids in cases.items():
        with pytest.raises(FormatError, match=message.replace("(", r"\(")):
            parse_image_sequence(t, fmt, ids)
    assert parse_image_sequence(t, fmt, good[:-1], require_eom=False).rest == []
