"""What a candidate tree may contain: one editable file, no links, nothing large.
Checked before anything runs."""

import os

EDITABLE = "train.py"
MAX_FILE_BYTES = 1_000_000


def check_tree(candidate, parent=None):
    """Named violations of the candidate folder (and of its difference from the
    parent folder, when given); an empty list means it may run."""
    problems = []
    if not os.path.isdir(candidate):
        return [f"not_a_folder: {candidate}"]
    for dirpath, dirnames, filenames in os.walk(candidate):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, candidate)
            if os.path.islink(path):
                problems.append(f"link: {rel}")
            elif os.path.isfile(path) and os.path.getsize(path) > MAX_FILE_BYTES:
                problems.append(f"file_too_large: {rel}")
            elif not (os.path.isfile(path) or os.path.isdir(path)):
                problems.append(f"special_file: {rel}")
    if not os.path.isfile(os.path.join(candidate, EDITABLE)):
        problems.append(f"missing: {EDITABLE}")
    if parent is not None:
        problems += [f"outside_editable_file: {rel}" for rel in _changed(parent, candidate) if rel != EDITABLE]
    return problems


def _files(root):
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def _changed(parent, candidate):
    a, b = _files(parent), _files(candidate)
    return sorted(rel for rel in set(a) | set(b) if a.get(rel) != b.get(rel))
