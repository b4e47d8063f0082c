"""eval/classify"""
