"""The main job: pipeline (analyses and their tables), claims judged from the tables, the
answer-first summary, and the self-contained HTML report drawn from the tables."""
