"""The service's routes, one module per concern, each an ``APIRouter`` mounted under ``/api/v1``."""
