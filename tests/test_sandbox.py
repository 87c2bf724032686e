"""Sandboxed scoring against the real reasoning-gym scorers, with real payloads (no mocks).

Which scorers run the model's answer as code (reasoning-gym 0.1.19): binary_matrix, spiral_matrix,
string_insertion and n_queens call `eval(answer)` when the answer is not the exact oracle string; countdown and
puzzle24 call `sympy.parse_expr(answer)`, which evals too. propositional_logic and syllogism parse by hand.
`test_payloads_really_run_without_the_sandbox` proves every payload below does its damage when the scorer runs
unsandboxed, so the sandbox tests can fail. Most tests use `raw` (eval_guard=False): the eval guard refuses
dunder payloads before they run, and the process sandbox (audit hook, seccomp, rlimits, timeouts) must hold alone.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import reasoning_gym as rg

from smolthink.sandbox import DEFAULT_TIMEOUT_S, Scorer
from smolthink.sandbox.policy import seccomp_available
from smolthink.sandbox.worker import valid_result

TIMEOUT = 1.0


def entry(task, seed=1, **cfg):
    return rg.create_dataset(task, seed=seed, size=1, **cfg)[0]


def _fork_exec_payload():
    """`_posixsubprocess.fork_exec` spawns `touch` without any audit event: only seccomp stops it."""
    import _posixsubprocess

    try:
        _posixsubprocess.fork_exec()
    except TypeError as e:  # "fork_exec() takes exactly N arguments (0 given)"
        n_args = int(str(e).split("exactly ")[1].split()[0])
    args = ("[b'/usr/bin/touch', b'{path}'], [b'/usr/bin/touch'], True, (), None, None, -1, -1, -1, -1, -1, -1, "
            "*__import__('os').pipe(), False, False, -1, None, None, None, -1, None" + ", True" * (n_args - 22))
    return "__import__('os').waitpid(__import__('_posixsubprocess').fork_exec(" + args + "), 0)"


# (task, payload); {path} is replaced by a canary path, once relative (to the cwd) and once absolute.
PAYLOADS = [
    ("binary_matrix", "__import__('os').system('touch {path}')"),
    ("binary_matrix", "open('{path}', 'w').write('x')"),
    ("spiral_matrix", "__import__('os').mkdir('{path}')"),
    ("string_insertion", "__import__('io').FileIO('{path}', 'w')"),
    ("n_queens", "__import__('shutil').copyfile(__file__, '{path}')"),
    ("countdown", "(lambda: __import__('pathlib').Path('{path}').touch())()"),
    ("puzzle24", "__import__('subprocess').run(['touch', '{path}'])"),
]
if sys.platform.startswith("linux") and os.path.exists("/usr/bin/touch"):
    PAYLOADS.append(("binary_matrix", _fork_exec_payload()))


def _cases(tmp_dir):
    """(task, answer, canary) for every payload, with a relative and an absolute canary."""
    out = []
    for i, (task, payload) in enumerate(PAYLOADS):
        for canary in (f"CANARY_{i}_rel", str(tmp_dir / f"CANARY_{i}_abs")):
            out.append((task, payload.format(path=canary), canary))
    return out


@pytest.fixture(scope="module")
def sandbox_cwd(tmp_path_factory):
    """The cwd the workers start in, so that a relative canary would appear here."""
    d = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


@pytest.fixture(scope="module")
def scorer(sandbox_cwd):
    with Scorer(timeout=TIMEOUT) as s:
        yield s


@pytest.fixture(scope="module")
def raw(sandbox_cwd):
    """The process sandbox without the eval guard, so that payloads really run inside it."""
    with Scorer(timeout=TIMEOUT, eval_guard=False) as s:
        yield s


def test_normal_scores(scorer):
    e = entry("syllogism")
    assert scorer.score("syllogism", {}, e["answer"], e) == (1.0, None)
    wrong = "No" if e["answer"] == "Yes" else "Yes"
    assert scorer.score("syllogism", {}, wrong, e) == (0.0, None)
    p = entry("propositional_logic")
    premise = next(q for q in p["metadata"]["premises"] if any(op in q for op in "∧∨→↔¬"))
    assert scorer.score("propositional_logic", {}, premise, p) == (1.0, None)  # a premise is entailed
    v = p["metadata"]["variables"][0]
    assert scorer.score("propositional_logic", {}, f"({v} ∧ ¬{v})", p) == (0.05, None)  # well-formed, not entailed
    c = entry("countdown")
    assert scorer.score("countdown", {}, c["answer"], c) == (1.0, None)
    assert scorer.score("countdown", {"min_numbers": 3, "max_numbers": 4}, c["answer"], c) == (1.0, None)


def test_none_answer_needs_no_worker():
    with Scorer() as s:
        assert s.score("syllogism", {}, None, entry("syllogism")) == (0.0, None)
        assert s._workers == [None]
        assert s.timeout == DEFAULT_TIMEOUT_S


def test_scorer_exceptions_and_bad_items_are_errors(scorer):
    f = entry("prime_factorization")
    score, err = scorer.score("prime_factorization", {}, "seven", f)  # its scorer raises on a non-number
    assert score == 0.0 and err.startswith("error: ValueError: invalid literal")
    assert scorer.score("no_such_task", {}, "x", f) == (0.0, "error: ValueError: unknown reasoning-gym task "
                                                              "'no_such_task'")
    score, err = scorer.score("syllogism", {}, "Yes", {"unpicklable": lambda: 0})
    assert score == 0.0 and err.startswith("error: cannot send item")


def test_result_validation():
    assert valid_result(0.25, None) == (0.25, None)
    for bad in (1.5, -0.1, float("nan"), "1.0", None, [1.0]):
        score, err = valid_result(bad, None)
        assert score == 0.0 and err.startswith("error: invalid score")


def test_payloads_really_run_without_the_sandbox(tmp_path):
    """Control: the same payloads through the same scorers, unsandboxed, in a subprocess with cwd=tmp_path."""
    cases = _cases(tmp_path)
    code = textwrap.dedent("""
        import json, sys, reasoning_gym as rg
        for task, answer in json.loads(sys.argv[1]):
            ds = rg.create_dataset(task, seed=1, size=1)
            ds.score_answer(answer, ds[0])
    """)
    subprocess.run([sys.executable, "-c", code, json.dumps([(t, a) for t, a, _ in cases])], cwd=tmp_path,
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    missing = [(t, a) for t, a, canary in cases if not (tmp_path / canary).exists()]
    assert not missing


@pytest.mark.parametrize("case", range(len(PAYLOADS)))
def test_payloads_never_touch_the_file_system(scorer, raw, sandbox_cwd, tmp_path, case):
    for task, answer, canary in _cases(tmp_path)[2 * case:2 * case + 2]:
        score, err = raw.score(task, {}, answer, entry(task))
        assert score == 0.0
        assert err.startswith(("error: SandboxViolation", "crashed: blocked system call")), err
        score, err = scorer.score(task, {}, answer, entry(task))  # the eval guard refuses it before it runs
        assert score == 0.0 and err.startswith("error: SandboxViolation: evaluated code"), err
        assert not (sandbox_cwd / canary).exists() and not (tmp_path / canary).exists()
    e = entry(task)
    assert raw.score(task, {}, e["answer"], e) == (1.0, None)  # still works
    assert os.listdir(sandbox_cwd) == []


@pytest.mark.skipif(not seccomp_available(), reason="no seccomp filter on this platform")
def test_the_seccomp_layer_catches_what_the_audit_hook_cannot(raw, tmp_path):
    canary = tmp_path / "CANARY"
    e = entry("binary_matrix")
    score, err = raw.score("binary_matrix", {}, _fork_exec_payload().format(path=canary), e)
    assert (score, err) == (0.0, "crashed: blocked system call (SIGSYS)")
    assert not canary.exists()


def test_hanging_payloads_time_out_without_a_restart(raw):
    b, c, p = entry("binary_matrix"), entry("countdown"), entry("puzzle24")
    assert raw.score("binary_matrix", {}, b["answer"], b) == (1.0, None)  # warm
    worker_pid = raw._workers[0].proc.pid
    for task, answer, e in [("binary_matrix", "9**9**9", b),  # CPU-bound, through eval
                            ("countdown", "9**9**9**9", c),  # through sympy.parse_expr
                            ("puzzle24", "__import__('time').sleep(60)", p)]:  # not CPU-bound
        t0 = time.monotonic()
        assert raw.score(task, {}, answer, e) == (0.0, "timeout")
        assert time.monotonic() - t0 < TIMEOUT + 1.0
        assert raw.score(task, {}, e["answer"], e) == (1.0, None)
    t0 = time.monotonic()
    assert raw.score("binary_matrix", {}, "'a'*10**10", b) == (0.0, None)  # RLIMIT_AS: fails at once
    assert time.monotonic() - t0 < TIMEOUT
    assert raw._workers[0].proc.pid == worker_pid  # the worker survived all of it


def test_crashing_payloads_are_errors(sandbox_cwd):
    """Each payload ends the scoring process in its own way. The deep recursion needs seconds of CPU to reach its
    SIGSEGV on a busy machine, so this sandbox gets a longer timeout than the other tests' (it must crash, not
    time out)."""
    b = entry("binary_matrix")
    deep = "__import__('sys').setrecursionlimit(10**8) or repr(__import__('functools').reduce(lambda a, _: [a], " \
           "range(10**5), []))"
    with Scorer(timeout=30.0, eval_guard=False) as raw:
        for answer, expected in [("__import__('os')._exit(3)", "crashed: exit code 3"),
                                 (deep, "crashed: killed by signal SIGSEGV"),
                                 ("__import__('ctypes').string_at(0)", "error: SandboxViolation: ctypes.string_at"),
                                 ("__import__('os').kill(__import__('os').getppid(), 9)",
                                  "error: SandboxViolation: os.kill")]:
            score, err = raw.score("binary_matrix", {}, answer, b)
            assert score == 0.0 and err.startswith(expected), (answer, err)
            assert raw.score("binary_matrix", {}, b["answer"], b) == (1.0, None)


def test_a_dead_worker_is_replaced(scorer):
    b = entry("binary_matrix")
    assert scorer.score("binary_matrix", {}, b["answer"], b) == (1.0, None)
    old = scorer._workers[0].proc
    os.kill(old.pid, signal.SIGKILL)
    old.wait()
    assert scorer.score("binary_matrix", {}, b["answer"], b) == (1.0, None)
    assert scorer._workers[0].proc.pid != old.pid


def test_payloads_cannot_forge_results_or_poison_later_calls(raw):
    b = entry("binary_matrix")
    forge = ("[__import__('os').write(fd, b'x' * 16 + b'\\x00' + __import__('struct').pack('<d', 1.0)) "
             "for fd in range(3, 10) if __import__('os').set_blocking(fd, True) is None] "
             "and __import__('os')._exit(0)")
    assert raw.score("binary_matrix", {}, forge, b) == (0.0, "crashed: no valid result from the scoring process")
    poison = "setattr(__import__('reasoning_gym').algorithmic.BinaryMatrixDataset, 'score_answer', lambda *a: 1.0)"
    assert raw.score("binary_matrix", {}, poison, b) == (0.0, None)  # patched only its own process
    assert raw.score("binary_matrix", {}, "[[0]]", b) == (0.0, None)


def test_score_many_keeps_order_runs_in_parallel_and_isolates_timeouts(sandbox_cwd):
    s, b = entry("syllogism"), entry("binary_matrix")
    hang = "__import__('time').sleep(60)"
    with Scorer(timeout=TIMEOUT, workers=2, eval_guard=False) as sc:
        assert sc.score_many([("syllogism", {}, s["answer"], s)] * 2) == [(1.0, None)] * 2  # start both workers
        t0 = time.monotonic()
        out = sc.score_many([("syllogism", {}, s["answer"], s), ("binary_matrix", {}, hang, b),
                             ("binary_matrix", {}, hang, b), ("binary_matrix", {}, b["answer"], b),
                             ("syllogism", {}, None, s), ("syllogism", {}, "nope", s),
                             ("binary_matrix", {}, "__import__('os')._exit(1)", b)])
        elapsed = time.monotonic() - t0
    assert out == [(1.0, None), (0.0, "timeout"), (0.0, "timeout"), (1.0, None), (0.0, None), (0.0, None),
                   (0.0, "crashed: exit code 1")]
    assert elapsed < 1.8 * TIMEOUT  # the two hangs ran side by side


def test_the_eval_guard_stops_an_in_process_reward_hack(scorer, raw):
    """Code run inside countdown's parse_expr can patch numpy so that the scorer's own check passes: a process
    sandbox cannot see that (the hack touches nothing outside the scoring process); the eval guard refuses it."""
    c = entry("countdown")
    hack = "(__import__('numpy').__dict__.update(isclose=max) or " + "+".join(map(str, c["metadata"]["numbers"])) + ")"
    code = ("import sys, reasoning_gym as rg; ds = rg.create_dataset('countdown', seed=1, size=1); "
            "print(ds.score_answer(sys.argv[1], ds[0]))")
    control = subprocess.run([sys.executable, "-c", code, hack], capture_output=True, text=True, timeout=60)
    assert control.stdout.strip() == "1.0"  # unsandboxed: full reward for a non-answer
    assert raw.score("countdown", {}, hack, c) == (1.0, None)  # the process sandbox alone: still fooled
    assert scorer.score("countdown", {}, hack, c) == (0.0, "error: SandboxViolation: evaluated code with a dunder "
                                                           "refused")
    setter = "setattr(Integer, 'is_zero', 1) or " + "+".join(map(str, c["metadata"]["numbers"]))
    assert scorer.score("countdown", {}, setter, c) == (0.0, "error: SandboxViolation: evaluated code using "
                                                             "'setattr' refused")
