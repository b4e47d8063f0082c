"""eval/dense"""
