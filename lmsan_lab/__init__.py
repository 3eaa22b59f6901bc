"""The lab: what red-teams and measures the defense, never what serves it.

Backdoor attacks to plant (`attacks`), the adaptive trigger variants (`adaptive`), the guard's
evaluation protocol (`evaluation`, `report`), the removal experiment on four tasks (`removal`),
the detection zoo (`zoo`) and the end-to-end demo (`demo`). The product package `lmsan_serve`
never imports this one; the `lmsan` CLI finds the lab's commands through the
`lmsan_serve.commands` entry point (`lmsan_lab.cli`). Plots need the `lab` extra (matplotlib).
"""
