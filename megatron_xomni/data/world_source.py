"""The built-in world as a data source: its prompt streams as a `PromptSource`, its images as an
image-text source, a WebDataset corpus of it, its texts (for the tiny text tokenizer) and held-out
evaluation images. With the world reward and the world benchmark, this is the only importer of
`megatron_xomni.world` (imported lazily: real corpora and prompt files never need it).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

from megatron_xomni.data.corpus import CorpusManifest, write_corpus
from megatron_xomni.data.corpus_source import BatchShape, ImageTextSource
from megatron_xomni.data.preprocess import ImagePreprocessConfig, preprocess
from megatron_xomni.data.prompts import PromptSource, has_value


def check_world_skills(skills: Sequence[str], what: str = "skills") -> None:
    from megatron_xomni.world import SKILLS

    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"{what}: unknown world skill(s) {unknown}; choose from {', '.join(SKILLS)}")


class WorldPromptSource(PromptSource):
    """Row i = world sample i of the chosen stream: {"id", "prompt": its caption, **its meta} (the
    meta holds the detector's `include`, the OCR `text` - None where a skill asks for none -, the
    skill, ...). Skills cycle: row i has skills[i % len(skills)]. Endless."""

    def __init__(self, split: str = "train", seed: int = 777, skills: Sequence[str] = (),
                 height: int = 64, width: int = 64) -> None:
        from megatron_xomni.world import SKILLS

        check_world_skills(skills)
        if split not in ("train", "heldout"):
            raise ValueError(f"world split {split!r}: choose train or heldout")
        self.split, self.seed, self.height, self.width = split, seed, height, width
        self.skills = list(skills) or list(SKILLS)
        self.name = f"world/{split}"
        self.num_rows = None

    def sample(self, index: int):
        """The WorldSample behind row `index` (image included)."""
        from megatron_xomni.world import held_out_sample, sample_world

        draw = sample_world if self.split == "train" else held_out_sample
        return draw(index, seed=self.seed, height=self.height, width=self.width,
                    skill=self.skills[index % len(self.skills)])

    def _row(self, index: int) -> dict:
        s = self.sample(index)
        return {**s.meta, "id": f"world/{self.split}/{self.seed}/{index}", "prompt": s.caption}

    def fields(self) -> set[str]:
        # which fields carry a value depends only on the skill: one row per skill tells them all
        return set().union(*({k for k, v in self[i].items() if has_value(v)} for i in range(len(self.skills))))


class WorldImageSource(ImageTextSource):
    """Record g = world training sample g of world `seed`, rendered at size x size (skill drawn by
    the world's own mix, or skills[g % len(skills)]). Endless; use it with a fixed BatchShape."""

    def __init__(self, seed: int = 0, size: int = 64, skills: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if skills is not None:
            check_world_skills(skills)
        self.seed, self.size, self.skills = seed, size, list(skills) if skills else None
        self.name = f"world(seed={seed}, {size}px)"

    def _record(self, index: int, shape: BatchShape):
        from megatron_xomni.world import sample_world

        skill = self.skills[index % len(self.skills)] if self.skills else None
        s = sample_world(index, seed=self.seed, height=self.size, width=self.size, skill=skill)
        self.report.count_yielded()
        return s.image, s.caption, s.meta


def world_images(indices: Iterable[int], size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """World training images `indices` as pixels [B, 3, size, size] in [-1, 1], and their captions."""
    batch = WorldImageSource(seed, size).gather(indices, BatchShape.fixed(size))
    return batch["pixels"], batch["prompts"]


def world_texts(num_samples: int = 2000, seed: int = 0) -> list[str]:
    """Captions and question/answer text of the built-in world (what the tiny tokenizer is trained on)."""
    from megatron_xomni.world import SKILLS, sample_world

    texts = []
    for i in range(num_samples):
        # cycle the skills so rare ones (rendered text) are covered in a small sample
        s = sample_world(i, seed=seed, skill=SKILLS[i % len(SKILLS)])
        texts.append(s.caption)
        texts.extend(f"{q} {a}" for q, a in s.qa)
    # grid headers "h w" for every size the format can produce
    texts.extend(f"{h} {w}" for h in range(1, 100) for w in (h, h // 2 + 1, 2 * h))
    return texts


def world_eval_set(n: int, size: int = 64, seed: int = 12345) -> list[tuple[torch.Tensor, str, dict]]:
    """Held-out world samples (disjoint seed stream) as (pixels [3, H, W], caption, {"qa": ...}) triples."""
    from megatron_xomni.world import held_out_prompts

    out = []
    for s in held_out_prompts(n, seed=seed, height=size, width=size):
        out.append((preprocess(s.image, ImagePreprocessConfig.tiny()), s.caption, {"qa": [list(p) for p in s.qa]}))
    return out


def write_world_corpus(
    out_dir: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    height: int = 64,
    width: int = 64,
    skills: Iterable[str] | None = None,
    samples_per_shard: int = 1000,
    world_config=None,
    **writer_kwargs,
) -> CorpusManifest:
    """Write `num_samples` images of the built-in world (megatron_xomni.world).

    skills=None uses the world's own skill mix; otherwise record i gets skill skills[i % len(skills)].
    Meta keeps the world's meta plus "qa" (question/answer pairs) and "world" (index, seed, skill), so
    the exact image can be regenerated.
    """
    from megatron_xomni.world import SKILLS, sample_world

    skill_list = None if skills is None else list(skills)
    if skill_list is not None:
        unknown = [s for s in skill_list if s not in SKILLS]
        if unknown or not skill_list:
            raise ValueError(f"skills must be a non-empty subset of {SKILLS}, got {skill_list}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")

    def records():
        for i in range(num_samples):
            skill = None if skill_list is None else skill_list[i % len(skill_list)]
            s = sample_world(i, seed=seed, height=height, width=width, skill=skill, config=world_config)
            meta = dict(s.meta)
            meta["qa"] = [[q, a] for q, a in s.qa]
            meta["world"] = {"index": i, "seed": seed, "skill": skill}
            yield s.image, s.caption, meta

    return write_corpus(records(), out_dir, samples_per_shard=samples_per_shard, **writer_kwargs)


def world_probe_samples(n_train: int, n_test: int, size: int = 64, seed: int = 0,
                        skills: Sequence[str] = ("single_object", "two_objects", "counting", "colors", "position",
                                                 "color_attr")):
    """(train, test) WorldSamples for linear probes of a tokenizer: train from the training stream,
    test held out (seed 777), skills cycling."""
    train = WorldPromptSource("train", seed=seed, skills=skills, height=size, width=size)
    test = WorldPromptSource("heldout", seed=777, skills=skills, height=size, width=size)
    return [train.sample(i) for i in range(n_train)], [test.sample(i) for i in range(n_test)]


def world_token_colours(samples, patch: int):
    """[N, tokens] int array: colour index of the object covering >= 30 % of a token's pixels, -1 for
    mixed tokens, -2 for background tokens (< 2 % of pixels away from the background colour)."""
    import numpy as np

    from megatron_xomni.world.vocab import COLORS

    out = []
    for s in samples:
        arr = np.asarray(s.image, dtype=np.float32)
        h, w = arr.shape[:2]
        fg = np.linalg.norm(arr - np.array(s.meta["background"], dtype=np.float32), axis=2) > 60
        owner = np.full(fg.shape, -1)
        for j, o in enumerate(s.meta["objects"]):
            x0, y0, x1, y1 = o["box"]
            owner[y0:y1, x0:x1] = j
        row = []
        for r in range(h // patch):
            for c in range(w // patch):
                sl = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
                f = fg[sl]
                if f.mean() < 0.02:
                    row.append(-2)
                    continue
                own = owner[sl][f]
                best = [j for j in set(own.tolist()) if j >= 0 and (own == j).sum() >= 0.3 * patch * patch]
                row.append(COLORS.index(s.meta["objects"][best[-1]]["color"]) if best else -1)
        out.append(row)
    return np.array(out, dtype=np.int64)


def world_image_labels(samples):
    """(shape, count, position) int arrays per image, -1 where the label does not apply: shape of a
    single object, object count of the counting skill, 3x3 cell of a single object's centre."""
    import numpy as np

    from megatron_xomni.world.vocab import SHAPES

    shape, count, pos = [], [], []
    for s in samples:
        objs = s.meta["objects"]
        shape.append(SHAPES.index(objs[0]["shape"]) if len(objs) == 1 else -1)
        count.append(len(objs) - 1 if s.meta["skill"] == "counting" else -1)
        if len(objs) == 1:
            x0, y0, x1, y1 = objs[0]["box"]
            cx, cy = (x0 + x1) / 2 / s.meta["width"], (y0 + y1) / 2 / s.meta["height"]
            pos.append(min(int(cy * 3), 2) * 3 + min(int(cx * 3), 2))
        else:
            pos.append(-1)
    return np.array(shape), np.array(count), np.array(pos)
