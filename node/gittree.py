"""The node's git repository: one editable file on branch "node"; a candidate is a
commit, a discard is a hard reset to the kept commit."""

import functools
import os
import subprocess
import tempfile

BRANCH = "node"
EDITABLE = "train.py"
IDENTITY = ["-c", "user.name=autoresearch-node", "-c", "user.email=node@autoresearch.invalid", "-c", "commit.gpgsign=false"]


class GitError(Exception):
    pass


class Tree:
    def __init__(self, path):
        self.path = path

    def git(self, *args, check=True, strip=True):
        r = subprocess.run(["git", *IDENTITY, *args], cwd=self.path, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise GitError(f"git {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
        return r.stdout.strip() if strip else r.stdout

    @property
    def file(self):
        return os.path.join(self.path, EDITABLE)

    def create(self, source):
        """A new repository whose first commit holds `source` as train.py."""
        os.makedirs(self.path, exist_ok=True)
        self.git("init", "-q", "-b", BRANCH)
        with open(self.file, "w") as f:
            f.write(source)
        self.git("add", EDITABLE)
        self.git("commit", "-q", "-m", "baseline")
        return self.head()

    def root(self):
        """The first commit: the train.py this home started from."""
        return self.git("rev-list", "--max-parents=0", BRANCH).split()[-1]

    def head(self):
        return self.git("rev-parse", "HEAD")

    def read(self, commit="HEAD"):
        return self.git("show", f"{commit}:{EDITABLE}", strip=False)

    def commit(self, source, message):
        with open(self.file, "w") as f:
            f.write(source)
        self.git("add", EDITABLE)
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def reset(self, commit):
        """Back to `commit` with a clean tree, whatever a killed process left behind."""
        lock = os.path.join(self.path, ".git", "index.lock")
        if os.path.exists(lock):  # left by a git killed mid-commit; the node's lock says no git runs now
            os.remove(lock)
        self.git("checkout", "-q", "-f", BRANCH)
        self.git("reset", "-q", "--hard", commit)
        self.git("clean", "-q", "-fdx")

    def is_clean(self):
        return self.git("status", "--porcelain") == ""

    def diff(self, a, b):
        """The unified diff of train.py from a to b, byte-exact (a last context line may be a lone space)."""
        return self.git("diff", a, b, "--", EDITABLE, strip=False)

    def apply_check(self, patch_path):
        """Files a patch touches; raises GitError if it does not apply to HEAD."""
        self.git("apply", "--check", patch_path)
        return [line.split("\t")[-1] for line in self.git("apply", "--numstat", patch_path).splitlines()]

    def apply(self, patch_path):
        self.git("apply", patch_path)
        with open(self.file) as f:
            return f.read()


def _scratch_git(folder, *args, stdin=None):
    """git outside any repository (a parent repository must not be found)."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=os.path.dirname(folder))
    return subprocess.run(["git", *IDENTITY, *args], cwd=folder, capture_output=True, text=True, env=env, input=stdin)


@functools.lru_cache(maxsize=1024)
def apply_diff(source, diff):
    """The file that a unified diff of train.py makes of `source`; GitError if it touches anything
    else (another file, a rename, a mode, binary data) or does not apply."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-apply-") as d:
        with open(os.path.join(d, EDITABLE), "w") as f:
            f.write(source)
        summary = _scratch_git(d, "apply", "--numstat", "--summary", "-", stdin=diff)
        if summary.returncode != 0:
            raise GitError(f"not a diff git can read: {summary.stderr.strip()[:200]}")
        touched, extra = set(), []
        for line in summary.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] != "-":
                touched.add(parts[2])
            else:
                extra.append(line.strip())
        if touched != {EDITABLE} or extra:
            raise GitError(f"the diff touches {', '.join(sorted(touched) + extra)[:200] or 'nothing'}; "
                           f"only changes to {EDITABLE} may travel")
        r = _scratch_git(d, "apply", "-", stdin=diff)
        if r.returncode != 0:
            raise GitError(f"the diff does not apply: {r.stderr.strip()[:200]}")
        with open(os.path.join(d, EDITABLE)) as f:
            return f.read()


def merge3(ours, base, theirs):
    """git's three-way merge of one file: (merged text, number of conflicts). git counts changes to
    adjacent lines as a conflict; in train.py's constants block (one constant per line) that would
    refuse most pairs of independent edits, so a conflict whose three sides have the same number of
    lines, and where no line was changed by both sides differently, is resolved line by line."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-merge-") as d:
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        r = _scratch_git(d, "merge-file", "-p", "--diff3", "-L", "ours", "-L", "base", "-L", "theirs",
                         "ours", "base", "theirs")
        if r.returncode < 0 or r.returncode > 127:
            raise GitError(f"git merge-file failed: {r.stderr.strip()[:200]}")
        if r.returncode == 0:
            return r.stdout, 0
        return _resolve_linewise(r.stdout)


def _resolve_linewise(merged):
    out, conflicts, lines, i = [], 0, merged.splitlines(keepends=True), 0
    while i < len(lines):
        if not lines[i].startswith("<<<<<<< ours"):
            out.append(lines[i])
            i += 1
            continue
        sides, part, i = {"ours": [], "base": [], "theirs": []}, "ours", i + 1
        while i < len(lines) and not lines[i].startswith(">>>>>>> theirs"):
            if lines[i].startswith("||||||| base"):
                part = "base"
            elif lines[i].startswith("=======") and part == "base":
                part = "theirs"
            else:
                sides[part].append(lines[i])
            i += 1
        i += 1
        o, b, t = sides["ours"], sides["base"], sides["theirs"]
        if len(o) == len(b) == len(t) and all(x == z or y == z or x == y for x, y, z in zip(o, t, b)):
            out += [y if x == z else x for x, y, z in zip(o, t, b)]
        else:
            conflicts += 1
            out += ["<<<<<<< ours\n", *o, "=======\n", *t, ">>>>>>> theirs\n"]
    return "".join(out), conflicts


def diff_texts(parent, child):
    """A git-style unified diff of train.py from `parent` to `child`."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-diff-") as d:
        for name, text in (("a", parent), ("b", child)):
            os.makedirs(os.path.join(d, name))
            with open(os.path.join(d, name, EDITABLE), "w") as f:
                f.write(text)
        r = _scratch_git(d, "diff", "--no-index", "--no-color", "--no-ext-diff", f"a/{EDITABLE}", f"b/{EDITABLE}")
        if r.returncode > 1:
            raise GitError(f"git diff failed: {r.stderr.strip()[:200]}")
        return r.stdout.replace(f"a/a/{EDITABLE}", f"a/{EDITABLE}").replace(f"b/b/{EDITABLE}", f"b/{EDITABLE}")
