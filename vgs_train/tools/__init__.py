"""What runs the loops for an answer: the demo, the seed study and its statistics, assessment of a model on the
embedded task, gradient analysis, job running, and the README sections generated from results."""
