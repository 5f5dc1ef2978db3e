"""Task registry: `config.task.name` -> the task's module. A new workload is one file here plus
one entry. A task module exports `Task` (a `tasks.base.Task`), `default_config()` (the `task`
section, `name` included) and `default_data_config()` (the `data` section)."""

from tasks import classification, denoise, language_model, masked_lm

TASKS = {
    'lm': language_model,
    'classification': classification,
    'mlm': masked_lm,
    'denoise': denoise,
}
