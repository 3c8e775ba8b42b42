"""Dataset statistics users need before they train: balance, sizes, duplicates, shortcuts.

The size-shortcut check answers "could a model tell the classes apart by image size alone?" by
scoring the simplest size-only classifier (majority class per exact width x height) against the
majority-class baseline. On thin sections where one class was scanned at another resolution, this
catches the shortcut before a model learns it.

The same question is asked of the image mode (RGB, L, RGBA, I;16...) and the file format (PNG, JPEG,
TIFF...): training converts every image to 8-bit RGB, but a grey image stays grey (R = G = B) and a
JPEG keeps its 8x8 block artefacts, so a class that alone is grey or alone is JPEG can be recognised
by that alone (:func:`attribute_shortcut`).

File names often carry a sample or patient id (``H1_23a_4.jpg``, ``patient017_slice3.png``,
``S12-03.tif``); images of one id must stay in one split. :func:`filename_ids` looks for a leading part
of the names, up to a separator, that several images share, and suggests the ``--group-regex`` that
keeps each id in one split.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handlens.data.catalog import Dataset, Image, Labelset
from handlens.data.queries import LabelledImage, duplicate_report, labelled_images
from handlens.data.splits import name_group

#: A class is flagged when the size-only classifier finds it with this precision and recall.
SIZE_SHORTCUT_SCORE = 0.9
#: ... or when this share of the other classes' images have sizes the class never has.
SIZE_NEVER_SEEN_SHARE = 0.5
#: The dataset is flagged when size alone beats the majority baseline by this much accuracy.
SIZE_ACCURACY_MARGIN = 0.15
#: A mode or format is a shortcut for a class when no other class has it and it covers this share of the
#: class's images (at least ATTRIBUTE_MIN_IMAGES of them) ...
ATTRIBUTE_SHORTCUT_SHARE = 0.5
ATTRIBUTE_MIN_IMAGES = 3
#: ... or when the class never has a value that this share of the other classes' images have
#: (SIZE_NEVER_SEEN_SHARE, as for sizes).

#: RGB images sampled per class (evenly through its images) to tell grey pictures stored as RGB from colour
GREY_SAMPLE = 16

#: File-name ids: the characters that separate the parts of a name (``H1_23a_4``, ``S12-03``).
NAME_SEPARATORS = "_- ."
#: A leading part of the names counts as an id when at least this many ids cover 2+ images each ...
ID_MIN_REPEATED = 3
#: ... and the images in repeated ids are at least this share of all images, and there are more ids than
#: classes (a class-name prefix like ``red_01.png`` is not a sample id; nor is one shared prefix ``img_``).
ID_MIN_SHARE = 0.5
#: Names are cut after at most this many parts (``H1``, ``H1_23a``, ``H1_23a_4``...).
ID_MAX_LEVELS = 3


def size_shortcut(images: list[LabelledImage]) -> dict[str, Any]:
    """How well image size alone predicts the class (see module docstring).

    Per class: precision and recall of the size-only classifier for that class. A class with both
    high is one a model can recognise without looking at its content.
    """
    if not images:
        return {"size_only_accuracy": 0.0, "majority_baseline": 0.0, "distinct_sizes": 0, "per_class": {}}
    by_size: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for img in images:
        by_size[(img.width, img.height)][img.label] += 1
    predicted = {size: counter.most_common(1)[0][0] for size, counter in by_size.items()}
    class_counts = Counter(img.label for img in images)
    hits: Counter[str] = Counter()
    predicted_counts: Counter[str] = Counter()
    for size, counter in by_size.items():
        guess = predicted[size]
        predicted_counts[guess] += sum(counter.values())
        hits[guess] += counter[guess]
    per_class = {}
    for c, n in sorted(class_counts.items()):
        own_sizes = {size for size, counter in by_size.items() if counter[c]}
        foreign = Counter({size: sum(counter.values()) for size, counter in by_size.items() if size not in own_sizes})
        others = len(images) - n
        per_class[c] = {
            "precision": round(hits[c] / predicted_counts[c], 4) if predicted_counts[c] else 0.0,
            "recall": round(hits[c] / n, 4),
            # share of the *other* classes' images whose size this class never has: a size-only
            # rule rules this class out for them (e.g. "224x224, so not class0").
            "others_with_sizes_never_seen": round(sum(foreign.values()) / others, 4) if others else 0.0,
            "sizes_never_seen": [f"{w}x{h}" for (w, h), _ in foreign.most_common(3)],
        }
    return {
        "size_only_accuracy": round(sum(hits.values()) / len(images), 4),
        "majority_baseline": round(max(class_counts.values()) / len(images), 4),
        "distinct_sizes": len(by_size),
        "per_class": per_class,
    }


def attribute_shortcut(values: dict[str, Counter[str]], attribute: str) -> dict[str, Any]:
    """Whether an image attribute (``mode``, ``format``) alone tells a class apart.

    ``values``: class -> Counter of the attribute's values. A finding is a value only one class has, on at
    least :data:`ATTRIBUTE_SHORTCUT_SHARE` of its images (``alone``), or a value a class never has while
    :data:`SIZE_NEVER_SEEN_SHARE` of the other classes' images have it (``never``). The verdict starts with
    "shortcut" or "no shortcut".
    """
    overall: Counter[str] = Counter()
    for counter in values.values():
        overall.update(counter)
    findings: list[dict[str, Any]] = []
    if len(values) > 1 and len(overall) > 1:
        for label, counter in sorted(values.items()):
            n = sum(counter.values())
            for value, count in counter.most_common():
                if count == overall[value] and count >= ATTRIBUTE_MIN_IMAGES and count / n >= ATTRIBUTE_SHORTCUT_SHARE:
                    findings.append({"class": label, "kind": "alone", "value": value, "images": count, "of": n})
        # "never" findings not already told by an "alone" one (with two classes they mirror each other)
        alone_values, alone_classes = {f["value"] for f in findings}, {f["class"] for f in findings}
        for label, counter in sorted(values.items()):
            others = sum(overall.values()) - sum(counter.values())
            for value, total in overall.most_common():
                if label in alone_classes or value in alone_values or counter[value] or not others:
                    continue
                if total / others >= SIZE_NEVER_SEEN_SHARE:
                    findings.append({"class": label, "kind": "never", "value": value, "images": total, "of": others})
    own = {f["class"]: f["value"] for f in findings if f["kind"] == "alone"}
    each_own = len(values) > 1 and len(own) == len(values)
    if each_own:  # one statement, not one per class (with two classes they mirror each other)
        verdict = f"shortcut: each class has its own {attribute} ({', '.join(f'{c}: {v}' for c, v in own.items())})"
    elif findings:
        first = findings[0]
        if first["kind"] == "alone":
            what = (f"class {first['class']!r} alone has {attribute} {first['value']} ({first['images']} of its "
                    f"{first['of']} images)")
        else:
            what = (f"class {first['class']!r} never has {attribute} {first['value']}, which {first['images']} of "
                    f"the other classes' {first['of']} images have")
        more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
        verdict = f"shortcut: {what}{more}"
    elif len(overall) <= 1:
        verdict = f"no shortcut: every image has {attribute} {next(iter(overall), '-')}"
    else:
        verdict = f"no shortcut: no {attribute} belongs to one class alone"
    return {"verdict": verdict, "values": dict(overall.most_common()), "findings": findings, "each_class_own": each_own}


_ATTRIBUTE_WHY = {
    "mode": "Training converts every image to RGB, but a grey image stays grey (R = G = B) and 16-bit or alpha "
            "images are rescaled or flattened their own way",
    "format": "Training decodes every file to the same kind of pixels, but JPEG compression leaves 8x8 block "
              "artefacts a network can see",
}


def grey_stored_as_rgb(found: dict[str, Any], images: list[LabelledImage], modes: dict[str, Counter[str]],
                       mode_of: dict[int, str]) -> dict[str, Any]:
    """A mode shortcut between L and RGB files that is none in pixels: when every RGB image sampled from a class
    (:data:`GREY_SAMPLE`, evenly) is a grey picture (:func:`~handlens.data.imaging.rgb_is_grey`), that class's
    RGB files look, once training converts every file to RGB, as L files do. The shortcut is asked again with
    those files counted as L; when it goes away, the verdict says why ("no shortcut: ..."). Only decodes
    anything when the stored modes alone found a shortcut involving L and RGB."""
    from handlens.data.imaging import rgb_is_grey

    if not found["findings"] or not {"L", "RGB"} <= {value for counter in modes.values() for value in counter}:
        return found
    grey: dict[str, int] = {}
    for label in sorted(modes):
        rgb = [img for img in images if img.label == label and mode_of.get(img.id) == "RGB"]
        count = min(GREY_SAMPLE, len(rgb))
        sample = [rgb[i * len(rgb) // count] for i in range(count)]  # spread evenly through the class
        if sample and all(rgb_is_grey(img.path) for img in sample):
            grey[label] = count
    if not grey:
        return found
    effective: dict[str, Counter[str]] = {}
    for label, counter in modes.items():
        effective[label] = Counter()
        for value, n in counter.items():
            effective[label]["L" if value == "RGB" and label in grey else value] += n
    again = attribute_shortcut(effective, "mode")
    classes = ", ".join(f"{label!r} ({n} of {n} sampled)" for label, n in grey.items())
    if again["findings"]:  # a shortcut in the pixels too, told as the pixels have it
        return {**again, "values": found["values"], "grey_rgb": grey,
                "verdict": f"{again['verdict']} (the RGB files of class(es) {classes} hold grey pictures, counted "
                           "as L: training converts every file to RGB, so they look as L files do)"}
    return {**again, "values": found["values"], "grey_rgb": grey,
            "verdict": f"no shortcut: the RGB files of class(es) {classes} hold grey pictures (R = G = B), which "
                       "look as the L files do once training converts every file to RGB"}


def _attribute_warning(finding: dict[str, Any], attribute: str) -> str:
    why = _ATTRIBUTE_WHY[attribute]
    if finding["kind"] == "alone":
        head = (f"class {finding['class']!r} alone has {attribute} {finding['value']} ({finding['images']} of "
                f"{finding['of']} images): a shortcut")
    else:
        head = (f"class {finding['class']!r} never has {attribute} {finding['value']}, which "
                f"{finding['images'] / finding['of']:.0%} of the other classes' images have: {attribute} alone "
                f"tells {finding['class']!r} apart from them (a shortcut)")
    fix = "convert the images to one format" if attribute == "format" else "convert the images to one mode"
    return (f"{head}. {why}: {fix} (or collect this class in the others' {attribute}) before you "
            "trust a model")


def _separators(stems: list[str]) -> str:
    seen = {ch for stem in stems for ch in stem if ch in NAME_SEPARATORS}
    return "".join(sorted(seen, key=NAME_SEPARATORS.index))


def id_regex(levels: int, separators: str) -> str:
    """The regex whose first group is a name's first ``levels`` parts: ``^([^_]+)_`` for 1 level and ``_``."""
    chars = separators.replace("-", "") + ("-" if "-" in separators else "")  # '-' last in a character class
    part = f"[^{chars}]+"
    sep = f"[{chars}]" if len(separators) > 1 else ("\\." if separators == "." else separators)
    return "^(" + sep.join([part] * levels) + ")" + sep


def filename_ids(images: list[LabelledImage], groups: int = 0) -> dict[str, Any]:
    """Does a leading part of the file names look like a sample or patient id? (module docstring)

    For each number of leading parts k (1..:data:`ID_MAX_LEVELS`), the ids are what :func:`id_regex`
    captures; a level qualifies per :data:`ID_MIN_REPEATED` and :data:`ID_MIN_SHARE`. The suggestion is the
    coarsest qualifying level: it keeps together everything a finer id would, so it cannot leak where the
    finer one would not (the finer levels are listed too). ``groups``: groups the catalog already has.
    """
    if not images:
        return {"verdict": "no ids in file names: no images", "levels": [], "suggested_regex": None}
    stems = [Path(img.path).stem for img in images]
    separators = _separators(stems)
    classes = len({img.label for img in images})
    levels: list[dict[str, Any]] = []
    single_prefix, class_prefix = None, None
    for k in range(1, ID_MAX_LEVELS + 1):
        if not separators:
            break
        pattern = id_regex(k, separators)
        regex = re.compile(pattern)
        ids: dict[str, list[LabelledImage]] = defaultdict(list)
        for img in images:
            group = name_group(regex, img.path)
            if group is not None:
                ids[group].append(img)
        if not ids:
            break
        sizes = [len(v) for v in ids.values()]
        repeated = [n for n in sizes if n >= 2]
        if len(ids) == 1:  # the deepest part every name shares (img_, tr_img_)
            single_prefix = next(iter(ids))
        elif class_prefix is None and len(ids) <= classes and all(len({i.label for i in v}) == 1 for v in ids.values()):
            class_prefix = sorted(ids)  # at any depth: red_01, tr_img_covid_001
        if len(repeated) >= ID_MIN_REPEATED and sum(repeated) / len(images) >= ID_MIN_SHARE and len(ids) > classes:
            example = next(img for members in ids.values() if len(members) >= 2 for img in members)
            levels.append({
                "regex": pattern, "ids": len(ids), "ids_with_several_images": len(repeated),
                "images_matched": sum(sizes), "min_images": min(repeated), "max_images": max(repeated),
                "ids_with_several_classes": sum(len({img.label for img in v}) > 1 for v in ids.values()),
                "example": {"name": Path(example.path).name, "id": name_group(regex, example.path)},
            })
    already = (f" (the dataset already has {groups} groups from its import; --group-by group uses them)"
               if groups else "")
    if not levels:
        if class_prefix is not None:
            verdict = (f"no ids in file names: they start with one prefix per class ({', '.join(class_prefix[:4])}"
                       f"{', ...' if len(class_prefix) > 4 else ''}), which names the class, not a sample")
        elif single_prefix is not None:
            verdict = (f"no ids in file names: they share one prefix ({single_prefix!r}), and no part after it "
                       "repeats the way a sample or patient id would")
        else:
            verdict = "no ids in file names: no leading part of the names repeats the way a sample or patient id would"
        return {"verdict": verdict + already, "levels": [], "suggested_regex": None}
    best = levels[0]
    sep = separators[0]
    span = (f"{best['min_images']} images each" if best["min_images"] == best["max_images"]
            else f"{best['min_images']}-{best['max_images']} images each")
    verdict = (f"file names look like <id>{sep}<n>: {best['ids_with_several_images']} ids with {span} "
               f"(e.g. {best['example']['name']} -> {best['example']['id']})")
    if len(levels) > 1:
        finer = levels[1]
        verdict += (f"; finer ids too ({finer['ids']} ids, e.g. {finer['example']['name']} -> "
                    f"{finer['example']['id']}, --group-regex '{finer['regex']}')")
    verdict += f"; if an id is a sample or patient, split with --group-regex '{best['regex']}'{already}"
    return {"verdict": verdict, "levels": levels, "suggested_regex": best["regex"]}


def _size_summary(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def dataset_stats(session: Session, dataset: Dataset, labelset: Labelset) -> dict[str, Any]:
    """Everything ``handlens stats`` shows, as plain data."""
    images = labelled_images(session, labelset)
    total_in_dataset = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id)) or 0
    mode_format = {row[0]: (row[1], row[2]) for row in session.execute(
        select(Image.id, Image.mode, Image.format).where(Image.dataset_id == dataset.id))}
    counts = Counter(img.label for img in images)
    n = len(images)
    per_class: dict[str, dict[str, Any]] = {}
    modes: dict[str, Counter[str]] = {}
    formats: dict[str, Counter[str]] = {}
    for label in sorted(counts):
        members = [img for img in images if img.label == label]
        modes[label] = Counter(mode_format[img.id][0] for img in members)
        formats[label] = Counter(mode_format[img.id][1] for img in members)
        per_class[label] = {
            "count": counts[label],
            "share": round(counts[label] / n, 4),
            "width": _size_summary([img.width for img in members]),
            "height": _size_summary([img.height for img in members]),
            "modes": dict(modes[label].most_common()),
            "formats": dict(formats[label].most_common()),
        }
    shortcut = size_shortcut(images)
    duplicates, conflicts = duplicate_report(session, dataset.id)
    conflicts = [c for c in conflicts if c["labelset"] == labelset.name]
    groups = {img.group for img in images if img.group}
    mode_shortcut = grey_stored_as_rgb(attribute_shortcut(modes, "mode"), images, modes,
                                       {i: m for i, (m, _) in mode_format.items()})
    format_shortcut = attribute_shortcut(formats, "format")
    ids = filename_ids(images, len(groups))
    warnings: list[str] = []
    if counts and len(counts) > 1:
        ratio = max(counts.values()) / min(counts.values())
        if ratio >= 3:
            warnings.append(f"classes are imbalanced ({ratio:.1f}:1); train with class_weights=auto or balancing")
    else:
        ratio = 1.0
        warnings.append("fewer than two classes: nothing to classify yet")
    for label, score in shortcut["per_class"].items():
        if min(score["precision"], score["recall"]) >= SIZE_SHORTCUT_SCORE and counts[label] >= 5 and len(counts) > 1:
            warnings.append(
                f"class {label!r}: image size alone identifies it (precision {score['precision']:.2f}, recall "
                f"{score['recall']:.2f}): a shortcut. Training resizes every image to one input size, so size "
                "itself is gone, but the resampling (grain scale, blur) still differs by class: compare "
                "explanations, and collect images of this class at the other sizes if you can"
            )
        elif score["others_with_sizes_never_seen"] >= SIZE_NEVER_SEEN_SHARE and len(counts) > 1:
            warnings.append(
                f"class {label!r} never has size {', '.join(score['sizes_never_seen'])}, which "
                f"{score['others_with_sizes_never_seen']:.0%} of the other classes' images have: size alone "
                f"tells {label!r} apart from them (a shortcut). Training resizes every image to one input size, "
                "so size itself is gone, but the resampling (grain scale, blur) still differs by class: "
                "check what the model looks at with `handlens explain`"
            )
    if shortcut["size_only_accuracy"] - shortcut["majority_baseline"] >= SIZE_ACCURACY_MARGIN:
        warnings.append(
            f"image size alone predicts the class with accuracy {shortcut['size_only_accuracy']:.2f} "
            f"(majority baseline {shortcut['majority_baseline']:.2f})"
        )
    for attribute, found in (("mode", mode_shortcut), ("format", format_shortcut)):
        if found["each_class_own"]:
            warnings.append(f"{found['verdict'][len('shortcut: '):]}: {attribute} alone tells the classes apart (a "
                            f"shortcut). {_ATTRIBUTE_WHY[attribute]}: convert the images to one {attribute} before "
                            "you trust a model")
        else:
            warnings += [_attribute_warning(finding, attribute) for finding in found["findings"]]
    if ids["suggested_regex"] and not groups:
        warnings.append(ids["verdict"])
    if duplicates:
        warnings.append(f"{len(duplicates)} sets of identical images; split with --group-by hash to keep "
                        "each set in one split")
    if conflicts:
        warnings.append(f"{len(conflicts)} identical images carry different labels (label conflicts)")
    return {
        "dataset": dataset.name,
        "labelset": labelset.name,
        "images": n,
        "images_in_dataset": total_in_dataset,
        "unlabelled_in_labelset": total_in_dataset - n,
        "classes": per_class,
        "imbalance_ratio": round(ratio, 3),
        "size_shortcut": shortcut,
        "mode_shortcut": mode_shortcut,
        "format_shortcut": format_shortcut,
        "filename_ids": ids,
        "groups": len(groups),
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "warnings": warnings,
    }
