"""The node's git repository: one editable file on branch "node"; a candidate is a
commit, a discard is a hard reset to the kept commit."""

import os
import subprocess

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
        return self.git("diff", a, b, "--", EDITABLE)

    def apply_check(self, patch_path):
        """Files a patch touches; raises GitError if it does not apply to HEAD."""
        self.git("apply", "--check", patch_path)
        return [line.split("\t")[-1] for line in self.git("apply", "--numstat", patch_path).splitlines()]

    def apply(self, patch_path):
        self.git("apply", patch_path)
        with open(self.file) as f:
            return f.read()
