"""Planning: cost and latency models, grouping, budget allocation, the loops that hit a target, the margin rule."""
from .plan import CompressionPlan, LayerPlan

__all__ = ['CompressionPlan', 'LayerPlan']
