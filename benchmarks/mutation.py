"""One-line mutations of the product, each run against only the tests that guard it.

Each mutation names a code fragment (found by its text, whitespace-insensitive, anywhere under
``tasks/`` and ``serving/``, so it survives files moving), the exact piece of it to change and
what to change it to, and the test node ids that must fail. The script copies the working tree
(tracked and untracked files, not ignored ones) to a temporary folder once, applies each
mutation there in turn, runs the guarding tests with ``PYTHONPATH`` on the copy, and restores
the file. The live checkout is never edited.

A mutation is *killed* when pytest exits 1 (a test failed); an error exit (collection, usage)
is reported as such, not as a kill. The guarding tests are first run unmutated on the copy: a
test that fails there would "kill" everything.

    python -m benchmarks.mutation                 # every mutation, writes results/mutation.md
    python -m benchmarks.mutation --only knn-k    # some, by name (results not written)
    python -m benchmarks.mutation --skip-slow     # leave out the ones needing a served Bento
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutation.md"
SEARCHED = ("tasks", "serving")
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Mutation:
    """``old`` replaced by ``new`` inside the one place whose text matches ``where``."""

    name: str
    what: str
    where: str
    old: str
    new: str
    tests: tuple[str, ...]
    slow: bool = False


MUTATIONS = (
    Mutation(
        "probabilities-ignore-temperature",
        "the inference path drops the student's temperature",
        "return torch.softmax(logits.float() / float(temperature), dim=1)",
        "logits.float() / float(temperature)",
        "logits.float()",
        (
            "tests/deploy/test_inference.py::"
            "test_predictor_answers_softmax_of_the_saved_logits_over_the_saved_temperature",
        ),
    ),
    Mutation(
        "service-ignores-temperature",
        "the Bento's model worker passes T = 1 instead of the student's",
        "self.predictor.model, images, self.predictor.spec.temperature",
        "self.predictor.spec.temperature",
        "1.0",
        (
            "tests/deploy/test_serving.py::"
            "test_served_probabilities_are_the_saved_logits_softened_by_the_saved_temperature",
        ),
        slow=True,
    ),
    Mutation(
        "threshold-on-test",
        "the decision threshold is chosen on the test split",
        'choose_threshold(labels["val"], probabilities["val"][:, 1], threshold_rule)',
        'labels["val"], probabilities["val"]',
        'labels["test"], probabilities["test"]',
        (
            "tests/test_evaluation.py::"
            "test_the_decision_threshold_is_youdens_on_validation_not_on_test",
        ),
    ),
    Mutation(
        "bootstrap-wrong-split",
        "the test intervals resample validation's patients",
        'patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]',
        'indices("test")',
        'indices("val")',
        (
            "tests/test_evaluation.py::"
            "test_the_decision_threshold_is_youdens_on_validation_not_on_test",
        ),
    ),
    Mutation(
        "transfer-crafted-on-student",
        "the teacher-transfer attack of evaluate_robustness is crafted on the student",
        "teacher_transfer_attack( context.student, context.teacher_features, context.clean,",
        "context.teacher_features",
        "context.student",
        (
            "tests/test_attacks.py::"
            "test_evaluate_robustness_crafts_the_teacher_transfer_attack_on_the_teacher_alone",
        ),
    ),
    Mutation(
        "knn-wrong-neighbour",
        "the k-NN OOD score uses the 6th neighbour instead of the 5th",
        "k = min(KNN_K, similarity.shape[1])",
        "KNN_K,",
        "KNN_K + 1,",
        (
            "tests/test_profile.py::test_knn_score_is_pinned_to_the_fifth_neighbour_by_graded_references",
        ),
    ),
    Mutation(
        "class-weight-inverted",
        "balanced class weights favour the majority class",
        "weights = len(labels) / (n_classes * np.maximum(counts, 1))",
        "len(labels) / (n_classes * np.maximum(counts, 1))",
        "(n_classes * np.maximum(counts, 1)) / len(labels)",
        (
            "tests/test_training_loop.py::"
            "test_balanced_class_weights_are_the_sample_count_over_classes_times_class_count",
        ),
    ),
    Mutation(
        "pgd-no-op",
        "PGD never steps: it is random noise in the ball",
        "delta = (delta.detach() + step_size * gradient.sign()).clamp(-eps, eps)",
        " + step_size * gradient.sign()",
        " + 0.0 * gradient.sign()",
        ("tests/test_attacks.py::test_pgd_at_8_over_255_breaks_the_undefended_student",),
    ),
    Mutation(
        "gate-bounds-swapped",
        "a minimum gate passes on the interval's upper bound",
        "ok = interval[0] >= bound",
        "interval[0]",
        "interval[1]",
        ("tests/test_attacks.py::test_gates_decide_on_the_intervals_unfavourable_bound",),
    ),
    Mutation(
        "closure-skips-lazy-imports",
        "a stage's code deps skip its in-function imports",
        "for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):",
        "ast.walk(",
        "ast.iter_child_nodes(",
        ("tests/test_layout.py::test_every_dvc_stage_depends_on_exactly_its_import_closure",),
    ),
    Mutation(
        "wilson-normal-approximation",
        "the Wilson half-width loses its z^2 / 4n^2 term",
        "half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)",
        " + z * z / (4 * n * n)",
        "",
        ("tests/test_metrics.py::test_wilson_interval_of_known_values",),
    ),
    Mutation(
        "label-rule-wrong-class",
        "the served label compares the negative class with the threshold",
        "return (probabilities[:, 1] >= threshold).astype(np.int64)",
        "probabilities[:, 1]",
        "probabilities[:, 0]",
        (
            "tests/deploy/test_inference.py::"
            "test_label_rule_uses_the_validation_threshold_for_two_classes",
        ),
    ),
    Mutation(
        "conformal-rank-off-by-one",
        "the OOD threshold takes the plain quantile, not the conformal rank",
        "rank = int(np.ceil((len(scores) + 1) * (1.0 - false_rejection)))",
        "(len(scores) + 1)",
        "len(scores)",
        (
            "tests/test_profile.py::test_the_threshold_is_the_conformal_quantile_of_validation_scores",
        ),
    ),
    Mutation(
        "temperature-multiplies",
        "evaluation's calibration multiplies the log-probabilities by T",
        "logits = np.log(np.clip(probabilities, 1e-30, 1.0)) / temperature",
        "/ temperature",
        "* temperature",
        (
            "tests/test_metrics.py::"
            "test_temperature_fitted_on_overconfident_scores_recovers_the_temperature",
        ),
    ),
    Mutation(
        "monochrome1-not-inverted",
        "MONOCHROME1 images are not inverted",
        "return 1.0 - display",
        "1.0 - display",
        "display",
        ("tests/test_dicom_io.py::test_monochrome1_is_inverted",),
    ),
)


@dataclass
class Outcome:
    mutation: Mutation
    file: str
    status: str  # killed, SURVIVED, error (rc), not found, ambiguous
    seconds: float


def copy_tree(destination: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, copied to ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _pattern(text: str) -> re.Pattern[str]:
    """``text`` as a regex in which any run of whitespace matches any run (or none around
    brackets and commas), so reformatting or moving the code keeps it findable."""
    tokens = re.split(r"(\s+)", text.strip())
    parts = [r"\s*" if token.isspace() else re.escape(token) for token in tokens]
    return re.compile("".join(parts))


def locate(tree: Path, mutation: Mutation) -> tuple[list[Path], re.Match[str] | None]:
    """The files under :data:`SEARCHED` whose text matches ``mutation.where`` (and the match
    when there is exactly one file with one match)."""
    pattern = _pattern(mutation.where)
    hits: list[tuple[Path, list[re.Match[str]]]] = []
    for folder in SEARCHED:
        for path in sorted((tree / folder).rglob("*.py")):
            matches = list(pattern.finditer(path.read_text()))
            if matches:
                hits.append((path, matches))
    if len(hits) == 1 and len(hits[0][1]) == 1:
        return [hits[0][0]], hits[0][1][0]
    return [path for path, _ in hits], None


def run_tests(tree: Path, tests: tuple[str, ...], show_failure: bool = False) -> int:
    """pytest on ``tests`` inside ``tree`` with the copy first on the import path; its exit
    code (``show_failure``: print the end of pytest's output when it is not 0)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return -1
    if show_failure and done.returncode != 0:
        print((done.stdout + done.stderr)[-4000:])
    return done.returncode


def apply_and_test(tree: Path, mutation: Mutation) -> Outcome:
    """Mutate the copy, run the guarding tests, restore the file."""
    files, match = locate(tree, mutation)
    if match is None:
        status = "pattern not found" if not files else f"ambiguous ({len(files)} files)"
        return Outcome(mutation, ", ".join(str(p.relative_to(tree)) for p in files), status, 0.0)
    path = files[0]
    original = path.read_text()
    fragment = match.group(0)
    if mutation.old not in fragment:
        return Outcome(mutation, str(path.relative_to(tree)), "old text not in the match", 0.0)
    mutated_fragment = fragment.replace(mutation.old, mutation.new, 1)
    path.write_text(original[: match.start()] + mutated_fragment + original[match.end() :])
    start = time.monotonic()
    try:
        rc = run_tests(tree, mutation.tests)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - start
    status = {0: "SURVIVED", 1: "killed", -1: "timeout"}.get(rc, f"error (rc {rc})")
    return Outcome(mutation, str(path.relative_to(tree)), status, seconds)


def write_table(outcomes: list[Outcome], baseline_s: float) -> str:
    """The Markdown report: machine, versions, date, then one row per mutation."""
    import torch  # heavy: only for its version string, once the runs are done

    killed = sum(o.status == "killed" for o in outcomes)
    head = [
        "# Mutation audit: one-line bugs against the tests that guard them",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `python -m benchmarks.mutation` (guarding tests green unmutated: "
        f"{baseline_s:.0f} s)",
        f"- result: **{killed} of {len(outcomes)} killed**",
        "",
        "| mutation | what breaks | file | change | guarding tests | killed | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        f"| {o.mutation.name} | {o.mutation.what} | `{o.file}` | "
        f"`{o.mutation.old.strip()}` → `{o.mutation.new.strip() or '(removed)'}` | "
        + "<br>".join(f"`{t.split('::')[-1]}`" for t in o.mutation.tests)
        + f" | {'yes' if o.status == 'killed' else 'no: ' + o.status} | {o.seconds:.0f} |"
        for o in outcomes
    ]
    return "\n".join(head + rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out served-Bento ones")
    args = parser.parse_args(argv)
    chosen = [
        m
        for m in MUTATIONS
        if (not args.only or m.name in args.only) and not (args.skip_slow and m.slow)
    ]
    with tempfile.TemporaryDirectory(prefix="medtransfer-mutation-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        start = time.monotonic()
        baseline = run_tests(tree, tests, show_failure=True)
        baseline_s = time.monotonic() - start
        if baseline != 0:
            print(f"the guarding tests fail unmutated (pytest rc {baseline}); fix them first")
            return 1
        outcomes = []
        for mutation in chosen:
            outcome = apply_and_test(tree, mutation)
            print(
                f"{mutation.name:36} {outcome.status:20} {outcome.seconds:6.0f} s  {outcome.file}"
            )
            outcomes.append(outcome)
    table = write_table(outcomes, baseline_s)
    if not args.only and not args.skip_slow:
        RESULTS.write_text(table)
        print(f"written {RESULTS.relative_to(ROOT)}")
    print(table)
    return 0 if all(o.status == "killed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
