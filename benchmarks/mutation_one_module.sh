#!/bin/bash
# Score one core module with mutmut in a scratch copy of the committed tree (see benchmarks/MUTATION.md).
#
#   benchmarks/mutation_one_module.sh MODULE SECONDS TEST_FILE [TEST_FILE ...]
#   e.g. benchmarks/mutation_one_module.sh objective 900 tests/test_objective.py
#
# The copy is /tmp/mut_MODULE (replaced), made with `git archive HEAD`: commit new tests first. Its
# pyproject.toml mutates only sa_peft/MODULE.py and maps only the given test files. The run stops after
# SECONDS (what was checked by then is kept in /tmp/mut_MODULE/mutants/); the per-status counts are printed
# and `mutmut results --all true` is written to /tmp/mut_MODULE/results.txt. MUTMUT_CHILDREN (default 1)
# sets mutmut's --max-children.
set -u
if [ $# -lt 3 ]; then
  sed -n 2,9p "$0"
  exit 2
fi
module=$1; seconds=$2; shift 2
tests=$(printf '"%s", ' "$@"); tests="[${tests%, }]"
repo=$(git rev-parse --show-toplevel) || exit 1
commit=$(git -C "$repo" rev-parse --short HEAD)
dir=/tmp/mut_$module
rm -rf "$dir" && mkdir "$dir" && git -C "$repo" archive HEAD | tar -x -C "$dir" && cd "$dir" || exit 1
python - "$module" "$tests" <<'PY'
import pathlib, re, sys
module, tests = sys.argv[1], sys.argv[2]
p = pathlib.Path("pyproject.toml"); s = p.read_text()
s = re.sub(r"only_mutate = \[.*?\]", f'only_mutate = ["sa_peft/{module}.py"]', s, flags=re.S)
s = s.replace('pytest_add_cli_args_test_selection = ["tests/"]', f"pytest_add_cli_args_test_selection = {tests}")
p.write_text(s)
PY
start=$(date +%s)
OMP_NUM_THREADS=1 PYTHONPATH=. timeout "$seconds" mutmut run --max-children "${MUTMUT_CHILDREN:-1}" > run.log 2>&1
rc=$?
end=$(date +%s)
mutmut results --all true > results.txt 2>&1
echo "sa_peft/$module.py at $commit: mutmut rc=$rc (124: stopped at $seconds s), wall $((end - start)) s"
awk -F': ' '{print $NF}' results.txt | sort | uniq -c
