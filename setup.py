"""Install hmc_plugin. Torch ranges admit 2.13.0 and 2.14.1 and never ask for anything newer."""
from setuptools import find_packages, setup

with open('README.md', encoding='utf-8') as readme:
    long_description = readme.read()

setup(
    name='hmc_plugin',
    version='0.1.0',
    description='HMC: hybrid model compression by layer sensitivity grouping, as a Microsoft NNI compressor',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    packages=find_packages(include=['hmc_plugin', 'hmc_plugin.*']),
    install_requires=[
        'torch>=2.1,<=2.14.1',
        'torch-pruning>=1.5,<1.7',
        'tensorly>=0.8,<0.11',
        'nni==3.0',
        'numpy>=1.24',
        'schema>=0.7',
        'tqdm>=4.60',
        'matplotlib>=3.6',
        'scikit-learn>=1.2',
        'pyyaml>=6.0',
        'filelock>=3.0',  # one baseline / scan per key when NNI trials run at the same time
        # NNI 3.0's nnictl and its remote trial tools import pkg_resources, which setuptools 81 removed.
        'setuptools<81',
    ],
    extras_require={
        'vision': ['torchvision>=0.16,<=0.29.1'],
        'deploy': ['onnx>=1.14', 'onnxruntime>=1.16'],  # ONNX export checks and latency_backend='onnxruntime'
        'test': [
            'pytest>=7',
            'hypothesis>=6',
            'torchvision>=0.16,<=0.29.1',
            'onnx>=1.14',
            'onnxruntime>=1.16',
            'selenium>=4.10',  # the NNI web UI test drives Debian's chromium through chromium-driver
            'requests>=2.28',
            'psutil>=5.9',
        ],
    },
    entry_points={'console_scripts': ['hmc=hmc_plugin.app.cli:main']},
)
