"""Web service (FastAPI app, viewer page) and prediction result formats (RLE, JSON)."""
