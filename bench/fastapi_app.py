"""Target C of bench.online: the pipeline behind FastAPI, as a user writes it without Ray.

    STAGELINE_HOME=H python -m uvicorn bench.fastapi_app:app --workers 2 --port P

A hand-written request model, one in-process Pipeline per worker process, a plain
(sync) endpoint: FastAPI runs it in its thread pool. Nothing tuned.
"""

# No `from __future__ import annotations`, as a user's FastAPI app would have none.

import os
from datetime import datetime
from typing import Any

import pandas as pd
from fastapi import FastAPI
from pydantic import BaseModel

from stageline.pipeline import Pipeline, records


class Record(BaseModel):
    transaction_id: str
    customer_id: str
    amount: float
    merchant_category: str
    ts: datetime
    country: str = "US"


class PredictRequest(BaseModel):
    records: list[Record]


# Loaded when uvicorn imports the app, once per worker, as such apps usually do.
pipeline = Pipeline.from_spec("pipelines/fraud.yaml", os.environ.get("STAGELINE_HOME"))
app = FastAPI()


@app.post("/predict")
def predict(body: PredictRequest) -> dict[str, Any]:
    frame = pd.DataFrame([r.model_dump() for r in body.records])
    return {"predictions": records(pipeline.predict(frame))}
