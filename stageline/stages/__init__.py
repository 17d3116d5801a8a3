"""Built-in stages. Import them by path in a spec: ``stageline.stages.model:XGBoostPredictor``."""
