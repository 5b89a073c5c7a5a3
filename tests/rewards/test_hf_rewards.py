"""hpsv2 and vlm_judge adapters on tiny RANDOM checkpoints built and saved here (nothing downloads)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any hub access would fail loudly instead of downloading

import pytest
import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel

from megatron_xomni.rewards import get_reward

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle", "two blue squares on a white table", "a sign that says hello"]


def _images():
    return [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (80, 48), (30, 30, 200)),
            Image.linear_gradient("L").resize((56, 70)).convert("RGB")]


def _byte_vocab():
    return {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}


# --------------------------------------------------------------------------------------------- hpsv2
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = _byte_vocab()
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(sorted(ByteLevel.alphabet()))})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _reference_cosine(path, prompts, images):
    """HPSv2's score computed by hand from the towers: normalise both projections, dot them."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    proc = CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        out = []
        for prompt, im in zip(prompts, img):
            ids = proc.tokenizer([prompt], return_tensors="pt")
            txt = model.text_projection(model.text_model(**ids).pooler_output)[0]
            out.append(float(torch.nn.functional.cosine_similarity(im, txt, dim=0)))
    return out


def test_hpsv2_matches_hand_computed_cosine(clip_dir):
    reward = get_reward("hpsv2", model_dir=str(clip_dir), batch_size=2)
    images = _images()
    scores = reward(PROMPTS, images, [{}] * 3)
    assert len(scores) == 3 and all(-1.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx(_reference_cosine(clip_dir, PROMPTS, images), abs=1e-5)
    # deterministic, independent of batching and of the other prompts in the batch
    assert get_reward("hpsv2", model_dir=str(clip_dir))(PROMPTS, images, [{}] * 3) == pytest.approx(scores, abs=1e-6)
    # the prompt matters (guards against pooling a constant position of the text)
    assert reward([PROMPTS[1]], images[:1], [{}])[0] != pytest.approx(scores[0], abs=1e-4)


def test_hpsv2_needs_a_local_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="model_dir"):
        get_reward("hpsv2")
    with pytest.raises(ValueError, match="no config.json"):
        get_reward("hpsv2", model_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------- vlm_judge
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# A Qwen-style chat template, trimmed to what one image + one question needs.
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = tmp_path_factory.mktemp("tiny_qwen25vl")
    vocab = _byte_vocab()
    merges = []
    for word in ["yes", "Yes", "no", "No"]:  # BPE merges so each answer is one token
        for k in range(1, len(word)):
            merges.append((word[:k], word[k]))
            vocab.setdefault(word[: k + 1], len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(path)
    return path


def _reference_judge(path, prompt, image, yes_words, no_words):
    """P(yes)/(P(yes)+P(no)) from one unbatched forward on a prompt string written out here."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    vision = AutoImageProcessor.from_pretrained(path)(images=[image], return_tensors="pt")
    n_image_tokens = int(vision["image_grid_thw"][0].prod()) // 4  # 2x2 patch merge
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>"
            f"Does this image show: {prompt}? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n")
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc, pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"]).logits[0, -1]
    probs = torch.softmax(logits, dim=-1)
    p_yes = sum(probs[tok.convert_tokens_to_ids(w)] for w in yes_words)
    p_no = sum(probs[tok.convert_tokens_to_ids(w)] for w in no_words)
    return float(p_yes / (p_yes + p_no))


def test_vlm_judge_matches_direct_softmax(qwen_dir):
    images = _images()
    reward = get_reward("vlm_judge", model_dir=str(qwen_dir), batch_size=2, yes_tokens=("yes",), no_tokens=("no",))
    scores = reward(PROMPTS, images, [{}] * 3)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    # batch of 2 (left-padded, different prompt lengths and image sizes) + batch of 1
    expected = [_reference_judge(qwen_dir, p, im, ["yes"], ["no"]) for p, im in zip(PROMPTS, images)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert reward(PROMPTS, images, [{}] * 3) == pytest.approx(scores, abs=1e-6)  # deterministic
    assert len(set(round(s, 6) for s in scores)) == 3  # the inputs matter


def test_vlm_judge_sums_answer_spellings(qwen_dir):
    image = _images()[0]
    reward = get_reward("vlm_judge", model_dir=str(qwen_dir))  # default: yes/Yes vs no/No
    (score,) = reward([PROMPTS[0]], [image], [{}])
    assert score == pytest.approx(_reference_judge(qwen_dir, PROMPTS[0], image, ["yes", "Yes"], ["no", "No"]), abs=1e-5)
    with pytest.raises(ValueError, match="single token"):
        get_reward("vlm_judge", model_dir=str(qwen_dir), yes_tokens=("absolutely",))
    with pytest.raises(ValueError, match="prompt"):
        get_reward("vlm_judge", model_dir=str(qwen_dir), question="Is it good?")
