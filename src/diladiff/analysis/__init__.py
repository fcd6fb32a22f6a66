"""The paper's analyses as commands on any run folder (issue 17): latent semantics and
robustness, cross-attention use."""
