"""The grid: many (model, set, plan) evaluations and sensitivity rows, run locally or on a Ray cluster.

`tasks` builds the task list and the cache keys, `work` is the one adapter to the engine's evaluation
(open a (model, set) worker state once, run many tasks on it), `local` and `ray_backend` run tasks and
stream results back as they finish, `rows` turns a result into its typed row (`EvalRow`, `SensitivityRow`:
`to_json()` is the contract's object), and `run.run_grid` resumes from the cache and an existing JSONL file.
Nothing here imports the `cache` package: the caller injects `lookup(task)` and `store(task, row)`.
"""
