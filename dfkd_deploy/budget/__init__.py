"""Wall-clock budgets (``--budget 30m``): calibrate the costs on this machine, plan the run to fit."""
