"""How good the verdicts are: the mutation score, the rule's sensitivity, and portability."""
