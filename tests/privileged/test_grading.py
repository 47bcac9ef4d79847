"""nbgrader autogrades a course on sandbox kernels (sandbox_kernel.grading): ten students'
submissions of a Python 3 and a Python 2.7 notebook, twenty notebooks, five of the students
hostile (a memory bomb, a fork bomb at the process limit, an endless loop, an output flood,
and one that reads the instructor's files, writes into another student's folder and plants a
link for the grader). Each hostile submission fails alone, with its reason in what the grader
shows; every other grade is right; nothing outside the submissions changes.

As root the grader's kernels run as nobody (the course folder is root's); in the rootless
rerun the grader is an instructor's account and its kernels run as the instructor, so the
read-only submission folder is what keeps their writes from reaching the grader.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import nbformat
import pytest

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

ASSIGNMENT = "ps1"
PY3, PY2 = "problems3", "problems2"
KERNELS = {PY3: ("python3-sandbox", "python"), PY2: ("python2.7-sandbox", "python")}
CELL_TIMEOUT_S = 5

PY3_SOLUTION = "def square(x):\n    return x * x\n"
PY2_SOLUTION = 'def greet(name):\n    print "greeting", name\n    return "hello " + name\n'
PY3_TEST = "assert square(3) == 9\nassert square(-2) == 4\n"
PY2_TEST = 'assert greet("ada") == "hello ada"\n'

MEMORY_BOMB = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))\n"
# every process of the bomb stays in the loop until the process limit refuses a fork; the
# children then sleep and leave (none returns into the kernel's own code)
FORK_BOMB = textwrap.dedent(
    """\
    import os, time
    while True:
        if os.fork() == 0:
            try:
                while True:
                    os.fork()
            except OSError:
                pass
            time.sleep(10)
            os._exit(0)
    """
)
ENDLESS = "while True:\n    pass\n" + PY3_SOLUTION
FLOOD = "i = 0\nwhile True:\n    i += 1\n    print(i, 'x' * 200)\n" + PY3_SOLUTION


def snoop(course: Path) -> str:
    """The submission that goes for the instructor's files: the source notebook (with the
    solution), the gradebook, another student's folder, and a link in its own folder for the
    grader to write through when it saves the graded notebook."""
    return textwrap.dedent(
        f"""\
        import os, json
        found = []
        for path in ({str(course / "gradebook.db")!r}, {str(course / "source")!r},
                     {str(course / "autograded" / "good1")!r}):
            found.append((path, os.path.exists(path)))
        for target in ({str(course / "autograded" / "good1" / ASSIGNMENT / "pwned.txt")!r},
                       {str(course / "submitted" / "good1" / ASSIGNMENT / "pwned.txt")!r}):
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "w") as f:
                    f.write("pwned")
            except OSError as exc:
                found.append((target, type(exc).__name__))
        try:
            os.replace("{PY3}.ipynb", "/tmp/mine.ipynb")
        except OSError as exc:
            found.append(("rename", type(exc).__name__))
        try:
            os.symlink({str(course / "gradebook.db")!r}, "{PY3}.ipynb")
        except OSError as exc:
            found.append(("symlink", type(exc).__name__))
        print(found)
        source = json.load(open({str(course / "source" / ASSIGNMENT / f"{PY3}.ipynb")!r}))
        exec(source["cells"][0]["source"])
        """
    )


def nbgrader_cell(source: str, grade_id: str, *, solution: bool) -> Any:
    cell = nbformat.v4.new_code_cell(source)  # type: ignore[no-untyped-call]
    cell.metadata.nbgrader = {
        "grade": not solution,
        "grade_id": grade_id,
        "locked": not solution,
        "schema_version": 3,
        "solution": solution,
        "task": False,
        **({} if solution else {"points": 1}),
    }
    return cell


def notebook(kind: str, answer: str) -> Any:
    kernel, language = KERNELS[kind]
    test = PY3_TEST if kind == PY3 else PY2_TEST
    nb = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    nb.cells = [
        nbgrader_cell(answer, f"{kind}-answer", solution=True),
        nbgrader_cell(test, f"{kind}-test", solution=False),
    ]
    nb.metadata.kernelspec = {"name": kernel, "display_name": kernel, "language": language}
    return nb


def submissions(course: Path) -> dict[str, dict[str, str]]:
    """Each student's answer cell per notebook."""
    good = {PY3: PY3_SOLUTION, PY2: PY2_SOLUTION}
    return {
        **{f"good{i}": good for i in range(1, 5)},
        "partial": {PY3: "def square(x):\n    return x * 2\n", PY2: PY2_SOLUTION},
        "memhog": {PY3: PY3_SOLUTION, PY2: MEMORY_BOMB + PY2_SOLUTION},
        "forker": {PY3: PY3_SOLUTION, PY2: FORK_BOMB + PY2_SOLUTION},
        "looper": {PY3: ENDLESS, PY2: PY2_SOLUTION},
        "flooder": {PY3: FLOOD, PY2: PY2_SOLUTION},
        "snoop": {PY3: snoop(course), PY2: PY2_SOLUTION},
    }


#: the scores nbgrader must record (memhog's submission fails as a whole: 0 for both
#: notebooks, and nbgrader names the failure)
EXPECTED = {
    "memhog": {PY3: 0.0, PY2: 0.0},
    **{f"good{i}": {PY3: 1.0, PY2: 1.0} for i in range(1, 5)},
    "partial": {PY3: 0.0, PY2: 1.0},
    "forker": {PY3: 1.0, PY2: 0.0},
    "looper": {PY3: 0.0, PY2: 1.0},
    "flooder": {PY3: 0.0, PY2: 1.0},
    "snoop": {PY3: 0.0, PY2: 1.0},
}


@pytest.fixture(autouse=True)
def _venv_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """nbgrader runs the ``alembic`` of its environment from PATH (also in-process)."""
    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) with its content's digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def make_course(course: Path) -> None:
    """The instructor's side: source notebooks, the released assignment, then the
    students' submissions."""
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    (course / "nbgrader_config.py").write_text(
        textwrap.dedent(
            f"""\
            c = get_config()
            c.CourseDirectory.root = {str(course)!r}
            c.CourseDirectory.course_id = "course101"
            import sandbox_kernel.grading
            sandbox_kernel.grading.configure(c)
            c.Execute.timeout = {CELL_TIMEOUT_S}
            """
        )
    )
    for kind, solution in ((PY3, PY3_SOLUTION), (PY2, PY2_SOLUTION)):
        nb = notebook(kind, "### BEGIN SOLUTION\n" + solution + "### END SOLUTION\n")
        nbformat.write(nb, course / "source" / ASSIGNMENT / f"{kind}.ipynb")  # type: ignore[no-untyped-call]
    nbgrader(course, "generate_assignment", ASSIGNMENT, "--create", "--force")
    for student, answers in submissions(course).items():
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        for kind, answer in answers.items():
            released = nbformat.read(  # type: ignore[no-untyped-call]
                course / "release" / ASSIGNMENT / f"{kind}.ipynb", as_version=4
            )
            released.cells[0].source = answer
            nbformat.write(released, folder / f"{kind}.ipynb")  # type: ignore[no-untyped-call]
        (folder / "timestamp.txt").write_text("2026-12-01 10:00:00.000000 UTC\n")


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an nbgrader command in the course; any but autograde must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args],
        cwd=course,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if args[0] != "autograde":
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def scores(course: Path) -> dict[str, dict[str, float]]:
    from nbgrader.api import Gradebook, MissingEntry

    out: dict[str, dict[str, float]] = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in submissions(course):
            for kind in (PY3, PY2):
                try:
                    nb = gb.find_submission_notebook(kind, ASSIGNMENT, student)
                except MissingEntry:
                    continue
                out.setdefault(student, {})[kind] = nb.score
    return out


def test_nbgrader_autogrades_hostile_and_honest_submissions(tmp_path: Path, kernels: Path) -> None:
    course = tmp_path / "course"
    make_course(course)
    before = {part: tree_digest(course / part) for part in ("source", "release", "submitted")}
    result = nbgrader(course, "autograde", ASSIGNMENT)
    log = result.stdout + result.stderr

    # every honest grade is right, and each hostile one is its own
    assert scores(course) == EXPECTED, log[-4000:]
    # the memory bomb fails its own submission alone, and the grader says why
    assert result.returncode != 0
    assert "student memhog's ps1/problems2.ipynb: the sandbox kernel died: out of memory" in log
    assert "There was an error processing assignment 'ps1' for student 'memhog'" in log
    for other in set(EXPECTED) - {"memhog"}:
        assert f"for student '{other}'" not in log, log[-4000:]

    graded = course / "autograded"
    outputs = {
        student: nbformat.read(graded / student / ASSIGNMENT / f"{PY3}.ipynb", as_version=4)  # type: ignore[no-untyped-call]
        for student in ("looper", "flooder", "snoop")
    }
    # the endless loop was interrupted at the cell budget
    assert any(o.get("ename") == "KeyboardInterrupt" for o in outputs["looper"].cells[0].outputs)
    # the flood left at most the cell budget in the graded notebook, and says so
    flood_file = graded / "flooder" / ASSIGNMENT / f"{PY3}.ipynb"
    assert flood_file.stat().st_size < 2 * 1024 * 1024
    assert any(
        "output past 1 MiB per cell was not kept" in o.get("text", "")
        for o in outputs["flooder"].cells[0].outputs
    )
    # the snoop saw none of the instructor's files, wrote nowhere, planted nothing
    snooped = "".join(o.get("text", "") for o in outputs["snoop"].cells[0].outputs)
    assert "('symlink', " in snooped and "('rename', " in snooped, snooped
    assert f"({str(course / 'gradebook.db')!r}, False)" in snooped, snooped
    assert f"({str(course / 'source')!r}, False)" in snooped, snooped
    # the fork bomb met the process limit in its own kernel
    forker2 = nbformat.read(graded / "forker" / ASSIGNMENT / f"{PY2}.ipynb", as_version=4)  # type: ignore[no-untyped-call]
    assert any(
        "Resource temporarily unavailable" in str(o.get("evalue", ""))
        for o in forker2.cells[0].outputs
    ), forker2.cells[0].outputs

    # nothing outside the graded copies changed; no link, no stray file in them
    after = {part: tree_digest(course / part) for part in ("source", "release", "submitted")}
    assert after == before
    for student in set(EXPECTED) - {"memhog"}:
        entries = tree_digest(graded / student)
        assert not [k for k, v in entries.items() if v.startswith("link:")], entries
        assert set(entries) <= {
            ASSIGNMENT,
            *(f"{ASSIGNMENT}/{n}" for n in (f"{PY3}.ipynb", f"{PY2}.ipynb", "timestamp.txt")),
        }, entries
    assert not (graded / "memhog" / ASSIGNMENT).exists()  # nbgrader removed the failed one


def test_grading_refuses_a_kernel_outside_the_sandbox(tmp_path: Path, kernels: Path) -> None:
    """A source notebook on a plain kernel: the submission is not run at all."""
    course = tmp_path / "course"
    make_course(course)
    src = course / "source" / ASSIGNMENT / f"{PY3}.ipynb"
    nb = nbformat.read(src, as_version=4)  # type: ignore[no-untyped-call]
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, src)  # type: ignore[no-untyped-call]
    nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
    marker = course / "ran-outside"
    folder = course / "submitted" / "good1" / ASSIGNMENT
    released = nbformat.read(folder / f"{PY3}.ipynb", as_version=4)  # type: ignore[no-untyped-call]
    released.cells[0].source = f"open({str(marker)!r}, 'w').close()\n" + PY3_SOLUTION
    nbformat.write(released, folder / f"{PY3}.ipynb")  # type: ignore[no-untyped-call]
    result = nbgrader(course, "autograde", ASSIGNMENT, "--student", "good1")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "asks for kernel 'python3', which is not a sandbox kernel" in log, log[-3000:]
    assert not marker.exists()
