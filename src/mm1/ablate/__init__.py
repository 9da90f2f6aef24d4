"""`mm1 ablate`: grids of configs trained and evaluated cell by cell into a study directory
(`grid` reads and checks them, `runner` runs them, `cell` trains and evaluates one,
`results` writes ablation.json and the paper-style report)."""
